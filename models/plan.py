"""Visual-compute plans: one policy per decoder layer saying what visual tokens cost there.

Every method in the literature (ViCA, ShortV, YOPO, VisiPruner, VTW, FastV, PDrop, CLS-knee,
gated cross-attention) and the field's simple baselines (random and uniform selection, pooling,
dominant tokens) is a composition of the per-layer decisions below (the method -> policy table is
in docs/methods.md). The resolved `Plan` is the single source of truth for the forward pass, the KV
cache, the FLOPs model, the benchmark and the logged efficiency metrics.

Plans are written as *rules* (see `conf/arch/*.yaml`): each rule applies a partial policy to a set
of layers given for a reference depth (the paper's LLaVA-1.5-7B indices) and is rescaled to the
model's depth by `scale_layers`. Rules are applied in order, later ones overriding earlier fields,
which is how presets combine (`arch=[vica,pdrop]`, or `arch=vica+pdrop`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .config import ConfigError, check_keys

VISUAL_UPDATE = ("full", "frozen")
TEXT_READS_VISUAL = ("full", "none", "sink")
KV_SOURCE = ("current", "embed")
SELF_ATTN = ("full", "local", "none")
SEMANTICS = ("renorm", "post_softmax_zero")
ATTENTION_SCORERS = ("attn_last", "value_aware")
BLIND_SCORERS = ("random", "uniform")  # read no attention, so they are valid before layer 0 too
SCORERS = ATTENTION_SCORERS + BLIND_SCORERS
SCORE_SOURCES = ("previous", "current")
POSITIONS = ("keep", "renumber")
ROUNDING = ("floor", "ceil")
ROUTERS = ("own", "shared")
ROUTER_INPUTS = ("raw", "normed")
GATES = ("tanh", "sigmoid")
SKIPPED = ("scaled", "identity")
PRE_LLM_METHODS = ("cls_knee", "dominant", "pool", "frames")
BUDGET_GROUPS = ("image", "unit")


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise ConfigError(f"{name} must be one of {list(options)}, got {value!r}")


@dataclass(frozen=True)
class Select:
    """Keep a subset of the current visual tokens before a layer (original positions are kept).

    `attn_last`: attention of the last prompt token to each visual token, head-averaged (FastV,
    PDrop). `value_aware`: norm of each visual token's contribution P[last, j] * V_j to the last
    token's attention output (VisiPruner). `source=previous` scores with the previous layer's
    attention (FastV, VisiPruner); `current` with this layer's own Q/K (PDrop).
    Scorers that read no attention (`models/blind_scores.py`), valid before any layer including
    layer 0 (where selecting is pruning before the LLM): `random` (seeded by `seed` and the image;
    arXiv 2511.02650's control) and `uniform` (an even lattice over the full patch grid).
    Budget: `keep` (fraction of the current tokens) or `threshold` (score > threshold, a
    per-sample count); `min_keep` guards against empty sets. Budgets apply per image (per tile
    for `uniform`); layout tokens (LLaVA-NeXT's newlines) are always kept (models/selection.py).
    `positions`: `keep` (survivors keep their RoPE positions, gaps stay: FastV, VTW, ViCA) or
    `renumber` (from this selection on, every token's RoPE position is its rank among the tokens
    still present, and a generated token's is the prompt's kept length plus its step, in the
    layers after the selection: what PyramidDrop's released code does). Scoring uses the
    positions before the selection.
    """

    scorer: str = "attn_last"
    source: str = "previous"
    keep: float | None = None
    threshold: float | None = None
    min_keep: int = 1
    seed: int = 0  # scorer=random only
    positions: str = "keep"
    per: str = "image"  # what a budget applies to: each image / video, or each unit (tile, time step)

    def __post_init__(self) -> None:
        _choice("select.scorer", self.scorer, SCORERS)
        _choice("select.per", self.per, BUDGET_GROUPS)
        _choice("select.source", self.source, SCORE_SOURCES)
        _choice("select.positions", self.positions, POSITIONS)
        if (self.keep is None) == (self.threshold is None):
            raise ConfigError("select needs exactly one of keep (a fraction) or threshold")
        if self.keep is not None and not 0 < self.keep <= 1:
            raise ConfigError(f"select.keep must be in (0, 1], got {self.keep}")
        if self.scorer == "value_aware" and self.source != "previous":
            raise ConfigError("select.scorer=value_aware scores the previous layer's attention output (source=previous)")
        if self.scorer in BLIND_SCORERS:
            if self.source != "previous":
                raise ConfigError(f"select.scorer={self.scorer} reads no attention and selects before the layer; drop select.source "
                                  "(source=current is for attention scorers)")
            if self.keep is None:
                raise ConfigError(f"select.scorer={self.scorer} needs keep (a fraction of the tokens), not threshold")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"select.seed must be an integer in [0, 2**32), got {self.seed!r}")
        if self.seed != 0 and self.scorer != "random":
            raise ConfigError(f"select.seed={self.seed} only seeds scorer=random, not scorer={self.scorer}")
        if self.min_keep < 1:
            raise ConfigError("select.min_keep must be >= 1")

    @property
    def reads_attention(self) -> bool:
        return self.scorer in ATTENTION_SCORERS

    @property
    def per_unit(self) -> bool:
        """Budgets per unit (tile, time step): asked for, or the uniform lattice's own."""
        return self.per == "unit" or self.scorer == "uniform"

    @property
    def scores_previous_layer(self) -> bool:
        """The previous layer must score the visual tokens (its last prompt token's attention)."""
        return self.reads_attention and self.source == "previous"

    def budget(self, n: int) -> int:
        """Tokens kept from `n` with a fractional budget (at least `min_keep`)."""
        return max(min(self.min_keep, n), int(math.ceil(self.keep * n - 1e-9))) if self.keep is not None else n


@dataclass(frozen=True)
class Route:
    """Learned layer skipping for visual tokens (Mixture-of-Depths for MLLMs: p-MoD, arXiv 2412.04449;
    gamma-MoD, arXiv 2410.13859), executed in models/routing.py.

    Before the layer a router (a zero-initialised `Linear(d, 1)`: every score ties at 0 and the earliest
    tokens win) scores each visual token; only the best `keep` fraction of each image's tokens enter the
    layer. The others are *absent* from it (no query, no key/value, no FFN: unlike `visual_update=frozen`,
    whose tokens still give K/V) and come back at the next layer. Text is never routed; layout tokens
    (LLaVA-NeXT's newlines) always enter. Kept tokens keep their RoPE positions.
    Budget per image: `rounding` of keep * n (p-MoD truncates, gamma-MoD rounds up), at least `min_keep`.
    `router`: `own` (one per routed layer, p-MoD) or `shared` (one for every layer routed with `shared`,
    gamma-MoD); `router_input`: the layer's input hidden state (`raw`, p-MoD) or its RMS normalisation
    without a weight (`normed`: gamma-MoD reads the layer's input norm, whose per-channel scale a
    zero-initialised router absorbs). The router's gate w reaches the loss through the FFN output of
    the kept tokens (x + attn + w * ffn) and, with `skipped=scaled`, through the skipped tokens' state
    (w * x; p-MoD's STRing); `identity` leaves them as they are (gamma-MoD). `gate`: `tanh`,
    w = 1 + gate_scale * tanh(s) (p-MoD: 1 at init) or `sigmoid`, w = sigmoid(s) (gamma-MoD's softmax over two
    logits: 0.5 at init). `aux`: weight of gamma-MoD's auxiliary loss (binary cross-entropy of each score
    against "kept"), 0 for none (p-MoD).
    """

    keep: float | None = None
    rounding: str = "floor"
    min_keep: int = 1
    router: str = "own"
    router_input: str = "raw"
    gate: str = "tanh"
    gate_scale: float = 0.2
    skipped: str = "scaled"
    aux: float = 0.0

    def __post_init__(self) -> None:
        _choice("route.rounding", self.rounding, ROUNDING)
        _choice("route.router", self.router, ROUTERS)
        _choice("route.router_input", self.router_input, ROUTER_INPUTS)
        _choice("route.gate", self.gate, GATES)
        _choice("route.skipped", self.skipped, SKIPPED)
        if self.keep is None:
            raise ConfigError("route needs keep: the fraction of each image's visual tokens that enter the layer")
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
            raise ConfigError(f"route.keep must be in (0, 1], got {self.keep!r}")
        if not isinstance(self.min_keep, int) or self.min_keep < 0:
            raise ConfigError(f"route.min_keep must be an integer >= 0, got {self.min_keep!r}")
        if self.aux < 0:
            raise ConfigError(f"route.aux must be >= 0 (0: no auxiliary loss), got {self.aux}")
        if self.gate_scale != 0.2 and self.gate != "tanh":
            raise ConfigError(f"route.gate_scale={self.gate_scale} scales gate=tanh only, not gate={self.gate}")

    def budget(self, n: int) -> int:
        """Visual tokens of an image with `n` candidates that enter the layer (models/routing.py
        computes the same on the device)."""
        k = math.floor(self.keep * n + 1e-9) if self.rounding == "floor" else math.ceil(self.keep * n - 1e-9)
        return min(n, max(k, self.min_keep))


@dataclass(frozen=True)
class PreSelect:
    """A step between the projector and the LLM that changes the visual tokens entering it
    (`models/pruning.py`); the prompt keeps its n_v `<image>` tokens.

    `cls_knee` (arXiv 2409.01162): cosine similarity of each patch feature to the CLS feature,
    sorted; keep the tokens before the knee of that curve (Kneedle: the point farthest from the
    chord), never fewer than `min_keep`.
    `dominant`: VisionZip's dominant tokens (arXiv 2412.04467, without its merged contextual
    tokens): the ceil(keep * n_v) tokens that the tower's CLS attends to most in its feature layer
    (heads averaged; a tower without CLS, SigLIP: the mean attention each token receives).
    `pool`: `kernel` x `kernel` average pooling of the projector output over each unit's grid (an
    image, a tile, a video's time step), from the top-left, and over `kernel_t` adjacent time steps
    of a video (same row and column); a side that a kernel does not divide ends in partial windows
    (their mean). The pooled tokens, in raster order, take the first slots (and positions) of their
    image span, or of their video's first pooled time step (which keeps its time).
    `frames`: uniform frame subsampling: of each video's t temporal steps the ceil(keep * t) steps of
    an even lattice (centred in equal parts) enter, the others are never run through the tower; images
    are untouched.
    Pruning methods keep their tokens in place, with their original positions.
    """

    method: str = "cls_knee"
    min_keep: int = 1
    keep: float | None = None  # dominant, frames
    kernel: int | None = None  # pool
    kernel_t: int | None = None  # pool: time steps per window (None: 1)

    def __post_init__(self) -> None:
        _choice("pre_llm.method", self.method, PRE_LLM_METHODS)
        if (self.keep is not None) != (self.method in ("dominant", "frames")):
            raise ConfigError(f"pre_llm.keep is the budget of method=dominant or frames only (got method={self.method}, keep={self.keep})")
        if (self.kernel is not None) != (self.method == "pool"):
            raise ConfigError(f"pre_llm.kernel is the window of method=pool only (got method={self.method}, kernel={self.kernel})")
        if self.kernel_t is not None and (self.method != "pool" or not isinstance(self.kernel_t, int) or self.kernel_t < 1):
            raise ConfigError(f"pre_llm.kernel_t is method=pool's window over time steps, an integer >= 1 (got method={self.method}, "
                              f"kernel_t={self.kernel_t!r})")
        if self.keep is not None and not 0 < self.keep <= 1:
            raise ConfigError(f"pre_llm.keep must be in (0, 1], got {self.keep}")
        if self.kernel is not None and (not isinstance(self.kernel, int) or self.kernel < 1):
            raise ConfigError(f"pre_llm.kernel must be an integer >= 1, got {self.kernel!r}")
        if self.min_keep < 1:
            raise ConfigError("pre_llm.min_keep must be >= 1")

    def tokens(self, n_visual: int) -> int | None:
        """Visual tokens of an `n_visual`-token image that enter the LLM; None when the count
        depends on the image (cls_knee) or on a video's steps (frames, pooling over time)."""
        if self.method == "dominant":
            return max(min(self.min_keep, n_visual), int(math.ceil(self.keep * n_visual - 1e-9)))
        if self.method == "pool" and (self.kernel_t or 1) == 1:
            grid = math.isqrt(n_visual)
            if grid * grid != n_visual:
                raise ValueError(f"pre_llm.method=pool needs a square patch grid, but an image has {n_visual} visual tokens")
            return math.ceil(grid / self.kernel) ** 2
        return None


@dataclass(frozen=True)
class LayerPolicy:
    visual_update: str = "full"  # full: visual tokens are queries, get attention output and FFN; frozen: none of it
    text_reads_visual: str = "full"  # none: text ignores visual keys; sink: all text->visual mass moves to one token
    visual_kv_source: str = "current"  # embed: visual K/V from this layer's norm of the projector output (ViCA)
    visual_self_attn: str = "full"  # local: w x w window on the patch grid (bidirectional); none: only itself
    window: int = 0
    visual_heads: tuple[int, ...] | None = None  # heads that touch visual tokens (YOPO); None = all
    visual_ffn: float = 1.0  # fraction of FFN neurons visual tokens use (the first ones, YOPO)
    select: Select | None = None  # token-set change before this layer
    drop_visual: bool = False  # every visual token leaves before this layer (VTW, YOPO cut, VisiPruner exit)
    xattn: bool = False  # a new gated cross-attention block runs before this layer (Flamingo/Mllama)
    mask_semantics: str = "renorm"  # post_softmax_zero: zero blocked visual columns after softmax, no renorm
    route: Route | None = None  # a router picks the visual tokens that take part in this layer (p-MoD, gamma-MoD)

    def __post_init__(self) -> None:
        _choice("visual_update", self.visual_update, VISUAL_UPDATE)
        _choice("text_reads_visual", self.text_reads_visual, TEXT_READS_VISUAL)
        _choice("visual_kv_source", self.visual_kv_source, KV_SOURCE)
        _choice("visual_self_attn", self.visual_self_attn, SELF_ATTN)
        _choice("mask_semantics", self.mask_semantics, SEMANTICS)
        if not 0.0 <= self.visual_ffn <= 1.0:
            raise ConfigError(f"visual_ffn must be in [0, 1], got {self.visual_ffn}")

    @property
    def updates_visual(self) -> bool:
        return self.visual_update == "full"

    @property
    def text_reads(self) -> bool:
        return self.text_reads_visual != "none"


DENSE = LayerPolicy()


@dataclass(frozen=True)
class Plan:
    name: str
    layers: tuple[LayerPolicy, ...]
    pre_llm: PreSelect | None = None

    @staticmethod
    def dense(num_layers: int) -> "Plan":
        return Plan("dense", (DENSE,) * num_layers)

    @property
    def is_dense(self) -> bool:
        return self.pre_llm is None and all(p == DENSE for p in self.layers)

    @property
    def needs_patch_grid(self) -> bool:
        """Pooling and uniform selection place tokens on the g x g patch grid (no CLS token among them)."""
        pooled = self.pre_llm is not None and self.pre_llm.method == "pool"
        return pooled or any(p.select is not None and p.select.scorer == "uniform" for p in self.layers)

    @property
    def renumbers(self) -> bool:
        """Some selection renumbers RoPE positions (`select.positions=renumber`)."""
        return any(p.select is not None and p.select.positions == "renumber" for p in self.layers)

    @property
    def draws_random(self) -> bool:
        return any(p.select is not None and p.select.scorer == "random" for p in self.layers)

    @property
    def xattn_layers(self) -> list[int]:
        return [i for i, p in enumerate(self.layers) if p.xattn]

    @property
    def routers(self) -> dict[int, str]:
        """Routed layer -> the name of its router (`MLLM.routers`): its index, or `shared`."""
        return {i: "shared" if p.route.router == "shared" else str(i) for i, p in enumerate(self.layers) if p.route is not None}

    def validate(self, num_heads: int) -> None:
        """Contradictions that only show with the whole plan; each error names the layer and field."""
        visual_left, grid_intact = True, self.pre_llm is None
        for i, p in enumerate(self.layers):
            where = f"layer {i}"
            if p.drop_visual and p.select is not None:
                raise ConfigError(f"{where}: drop_visual and select both change the token set; keep one")
            if (p.drop_visual or p.select is not None) and not visual_left:
                field_name = "drop_visual" if p.drop_visual else "select"
                raise ConfigError(f"{where}: {field_name} has no visual tokens left (they were dropped earlier)")
            if p.route is not None:
                _check_route(p, self.layers[i + 1] if i + 1 < len(self.layers) else None, visual_left, where)
            if p.drop_visual:
                visual_left = False
            if p.select is not None:
                if p.select.scorer == "uniform" and not grid_intact:
                    raise ConfigError(f"{where}: select.scorer=uniform spreads tokens over the full patch grid, but tokens were "
                                      "pruned or pooled before it; select uniformly before the first pruning step")
                grid_intact = False
                prev = self.layers[i - 1] if i > 0 else None
                if p.select.scores_previous_layer and (prev is None or not prev.text_reads or prev.mask_semantics != "renorm"):
                    raise ConfigError(
                        f"{where}: select.source=previous scores the previous layer's text->visual attention, "
                        f"which {'does not exist' if prev is None else 'is off or post-softmax there'}; use source=current"
                    )
            if not p.updates_visual:
                for name, default in (("visual_self_attn", "full"), ("visual_ffn", 1.0), ("window", 0)):
                    if getattr(p, name) != default:
                        raise ConfigError(f"{where}: {name}={getattr(p, name)} has no effect with visual_update=frozen")
            if p.visual_self_attn == "local":
                if p.window < 1 or p.window % 2 == 0:
                    raise ConfigError(f"{where}: visual_self_attn=local needs an odd window >= 1, got window={p.window}")
                if not grid_intact:
                    raise ConfigError(f"{where}: visual_self_attn=local needs the full patch grid, but tokens were pruned before it")
            elif p.window:
                raise ConfigError(f"{where}: window={p.window} is set but visual_self_attn={p.visual_self_attn}")
            if p.visual_heads is not None:
                bad = [h for h in p.visual_heads if not 0 <= h < num_heads]
                if bad or not p.visual_heads:
                    raise ConfigError(f"{where}: visual_heads {list(p.visual_heads)} must be a non-empty subset of 0..{num_heads - 1}")
            if p.text_reads_visual == "sink" and p.visual_heads is not None:
                raise ConfigError(f"{where}: text_reads_visual=sink merges all heads' visual mass; drop visual_heads")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pre_llm": asdict(self.pre_llm) if self.pre_llm else None, "layers": [_policy_dict(p) for p in self.layers]}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Plan":
        return Plan(
            d["name"],
            tuple(make_policy(p, f"layer {i}") for i, p in enumerate(d["layers"])),
            PreSelect(**d["pre_llm"]) if d.get("pre_llm") else None,
        )


def _check_route(p: LayerPolicy, nxt: LayerPolicy | None, visual_left: bool, where: str) -> None:
    """What a routed layer cannot be combined with, and why."""
    if not visual_left or p.drop_visual:
        raise ConfigError(f"{where}: route has no visual tokens to route (they were dropped before or by this layer)")
    if not p.updates_visual:
        raise ConfigError(f"{where}: route picks the visual tokens a layer updates, but visual_update=frozen updates none "
                          "there (ViCA, xattn and ShortV freeze them), so routing would save nothing; keep one of the two")
    if p.select is not None and p.select.source == "current":
        raise ConfigError(f"{where}: route and select.source=current both choose visual tokens inside the layer; select "
                          "before the layer (source=previous) or in another layer")
    if nxt is not None and nxt.select is not None and nxt.select.scores_previous_layer:
        raise ConfigError(f"{where}: the next layer's select.source=previous scores this layer's attention, which sees only "
                          "the visual tokens the router kept; select before a layer that is not routed")


def _policy_dict(p: LayerPolicy) -> dict[str, Any]:
    """Only the fields that differ from dense: resolved plans stay readable in YAML/JSON."""
    out = {}
    for f in fields(LayerPolicy):
        v = getattr(p, f.name)
        if v != getattr(DENSE, f.name):
            out[f.name] = asdict(v) if isinstance(v, (Select, Route)) else (list(v) if isinstance(v, tuple) else v)
    return out


POLICY_FIELDS = {f.name for f in fields(LayerPolicy)}


def make_policy(d: dict[str, Any], where: str, base: LayerPolicy = DENSE) -> LayerPolicy:
    """`base` with the fields of `d` replaced; unknown fields name the place and a suggestion."""
    check_keys(d, POLICY_FIELDS, where)
    d = dict(d)
    for name, cls in (("select", Select), ("route", Route)):
        if isinstance(d.get(name), dict):
            check_keys(d[name], {f.name for f in fields(cls)}, f"{where}.{name}")
    if d.get("visual_heads") is not None:
        d["visual_heads"] = tuple(int(h) for h in d["visual_heads"])
    try:
        for name, cls in (("select", Select), ("route", Route)):
            if isinstance(d.get(name), dict):
                d[name] = cls(**d[name])
        return replace(base, **d)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


# --- rules -> plan ----------------------------------------------------------------------------


# A rule: `set` (partial policy) applied to `layers` (indices for a `reference_depth`-layer model,
# or "all"), or to every layer from `from_layer` on; `ranked` lists keep their fraction when scaled;
# `heads_fraction` sets visual_heads to the first ceil(f * H) heads.
RULE_KEYS = {"set", "layers", "reference_depth", "ranked", "from_layer", "heads_fraction"}


def scale_layers(indices: list[int], reference_depth: int, depth: int, ranked: bool) -> list[int]:
    """Map layer indices chosen for a `reference_depth`-layer model onto `depth` layers.

    Unranked sets map each index i to floor(i * depth / reference_depth) (relative depth is what
    the papers' choices encode). Ranked lists (ShortV's layers in Layer-Contribution order) keep
    the same *fraction* of layers: the first round(N * depth / reference_depth) distinct mapped
    indices in rank order (a list cannot grow: deeper models keep at most the listed layers, so
    rank their own layers with the analysis tools instead).
    """
    for i in indices:
        if not 0 <= i < reference_depth:
            raise ConfigError(f"layer index {i} is out of range for reference_depth={reference_depth}")
    mapped = [min(depth - 1, i * depth // reference_depth) for i in indices]
    if depth == reference_depth:
        mapped = list(indices)
    unique = list(dict.fromkeys(mapped))
    if ranked:
        n = max(1, round(len(indices) * depth / reference_depth))
        return sorted(unique[:n])
    return sorted(unique)


def plan_from_rules(spec: dict[str, Any], num_layers: int, num_heads: int) -> Plan:
    """A resolved, validated plan from an `arch` config: `{name, rules: {rule_name: rule}, pre_llm}`."""
    spec = dict(spec)
    check_keys(spec, {"name", "rules", "pre_llm", "layers"}, "arch")
    if spec.get("layers") is not None:  # an explicit per-layer plan (written by the analysis tools)
        layers = spec["layers"]
        if len(layers) != num_layers:
            raise ConfigError(f"arch.layers has {len(layers)} entries but the model has {num_layers} layers")
        policies = [make_policy(p or {}, f"arch.layers[{i}]") for i, p in enumerate(layers)]
    else:
        policies = [DENSE] * num_layers
    for rule_name, rule in (spec.get("rules") or {}).items():
        where = f"arch.rules.{rule_name}"
        if rule is None:
            continue
        check_keys(rule, RULE_KEYS, where)
        targets = _rule_layers(rule, num_layers, where)
        update = dict(rule.get("set") or {})
        if rule.get("heads_fraction") is not None:
            update["visual_heads"] = list(range(max(1, math.ceil(rule["heads_fraction"] * num_heads))))
        for i in targets:
            policies[i] = make_policy(update, f"{where} (layer {i})", base=policies[i])
    pre = spec.get("pre_llm")
    if pre:
        check_keys(pre, {f.name for f in fields(PreSelect)}, "arch.pre_llm")
    plan = Plan(str(spec.get("name") or "+".join(spec.get("rules") or {}) or "dense"), tuple(policies), PreSelect(**pre) if pre else None)
    plan.validate(num_heads)
    return plan


def _rule_layers(rule: dict, depth: int, where: str) -> list[int]:
    ref = rule.get("reference_depth") or depth
    if rule.get("from_layer") is not None:
        start = int(rule["from_layer"])
        if not 0 <= start < ref:
            raise ConfigError(f"{where}.from_layer={start} is out of range for reference_depth={ref}")
        first = scale_layers([start], ref, depth, ranked=False)[0]
        return list(range(first, depth))
    layers = rule.get("layers", "all")
    if layers == "all":
        return list(range(depth))
    try:
        return scale_layers([int(i) for i in layers], ref, depth, bool(rule.get("ranked")))
    except ConfigError as e:
        raise ConfigError(f"{where}.layers: {e}") from None
