"""The papers' architectures as plan builders: knobs in, per-layer rules out.

Each builder receives its knobs (defaults = the paper's LLaVA-1.5 settings, with layer indices for
`reference_depth` layers) and returns rules `{layers, set}` for the actual depth, or a pre-LLM
step `{pre_llm: {...}}` (at most one per plan), and `{variant: "knob=value"}` where it departs from
the paper's released method (the plan's name then says so, e.g. `pdrop[positions=keep]`); `resolve_arch`
applies the rules of every method in the `arch` config in order (so `arch=[vica,pdrop]` composes)
and validates the result. Knobs are plain config values, so sweeps override them directly, e.g.
`arch.methods.fastv.R=0.75`. A plan written by hand uses the `rules` method (or an explicit
per-layer list under `arch.layers`, as the analysis tools emit).
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any, Callable

import yaml

from .config import ConfigError, check_keys
from .family import FAMILIES
from .layer_kinds import place_scored_selections
from .plan import Plan, PreSelect, plan_from_rules, scale_layers

Rule = dict[str, Any]
PLAN_BUILDERS: dict[str, Callable[..., list[Rule]]] = {}  # `arch.methods.<name>` -> builder


def method(fn):
    """Register a plan builder under its function name; its keyword parameters are its knobs."""
    PLAN_BUILDERS[fn.__name__] = fn
    return fn


def knobs_of(builder: Callable[..., list[Rule]]) -> list[str]:
    """A builder's knob names: its parameters after `depth, heads` (a keyword-only `family`, the
    model family's name, is context, not a knob)."""
    return [n for n in list(inspect.signature(builder).parameters)[2:] if n != "family"]


def _scaled(layers, reference_depth, depth, ranked=False, min_layer=0):
    return [max(min_layer, i) for i in scale_layers(list(layers), reference_depth, depth, ranked)]


@method
def vica(depth, heads, t2v_layers=(0, 1, 7, 8, 9, 10, 11, 14), reference_depth=32):
    """ViCA (arXiv 2602.07574): visual tokens are never updated (no Q, no attention output, no FFN);
    text reads them only in the T2V layers, with K/V from that layer's own norm and projections of
    the projector output. Every other layer is text-only."""
    t2v = _scaled(t2v_layers, reference_depth, depth)
    return [
        {"layers": "all", "set": {"visual_update": "frozen", "text_reads_visual": "none"}},
        {"layers": t2v, "set": {"text_reads_visual": "full", "visual_kv_source": "embed"}},
    ]


@method
def xattn(depth, heads, every=4, start=3, reference_depth=32):
    """Gated cross-attention (Flamingo / Mllama): the self-attention stack is text-only and new
    zero-gated cross-attention blocks read the projector output before every `every`-th layer
    from `start` (Mllama 11B: 8 blocks over Llama-3.1-8B's 32 layers). Other depths keep the
    fraction of blocks, evenly spaced from the same relative start."""
    n = max(1, round(len(range(start, reference_depth, every)) * depth / reference_depth))
    at = sorted({min(depth - 1, math.floor((start / reference_depth + j / n) * depth)) for j in range(n)})
    return [
        {"layers": "all", "set": {"visual_update": "frozen", "text_reads_visual": "none"}},
        {"layers": at, "set": {"xattn": True}},
    ]


SHORTV_7B = (31, 29, 30, 28, 0, 26, 27, 25, 24, 22, 23, 21, 2, 3, 20, 18, 17, 12, 19)
# ShortV's released layer lists (its README), in Layer-Contribution order, by (family, depth): (N, ranking).
SHORTV_PAPER = {
    ("llava", 32): (19, SHORTV_7B),  # LLaVA-1.5-7B
    ("llava", 40): (24, (39, 32, 28, 36, 27, 37, 29, 30, 1, 38, 25, 31, 2, 26, 23, 34, 0, 33, 35, 22, 24, 21, 20, 17)),  # 1.5-13B
    ("llava_next", 32): (19, (31, 29, 30, 28, 26, 27, 22, 24, 21, 23, 25, 20, 19, 17, 18, 15, 12, 0, 2)),  # NeXT-7B
    ("llava_next", 40): (24, (39, 32, 29, 36, 27, 30, 37, 23, 25, 31, 26, 2, 28, 22, 33, 35, 34, 24, 38, 21, 20, 18, 1, 17)),  # NeXT-13B
}


@method
def shortv(depth, heads, N="paper", ranked_layers="paper", reference_depth="paper", *, family="llava"):
    """ShortV (arXiv 2504.00502): in the N layers with the lowest visual Layer Contribution, visual
    tokens are frozen (no Q, attention output or FFN); text still reads their stale K/V.
    `paper` takes the paper's list for the model (`SHORTV_PAPER`: LLaVA-1.5-7B/13B, LLaVA-NeXT-7B/13B,
    by family and depth), else LLaVA-1.5-7B's scaled to the depth; `python -m train analyze shortv`
    ranks a model's own layers."""
    paper_n, paper_ranking = SHORTV_PAPER.get((family, depth), SHORTV_PAPER[("llava", 32)])
    paper_depth = depth if (family, depth) in SHORTV_PAPER else 32
    N = paper_n if N == "paper" else N
    ranked_layers = paper_ranking if ranked_layers == "paper" else ranked_layers
    reference_depth = paper_depth if reference_depth == "paper" else reference_depth
    if not isinstance(N, int) or not 0 < N <= len(ranked_layers):
        raise ConfigError(f"shortv.N={N} must be in 1..{len(ranked_layers)}")
    frozen = scale_layers(list(ranked_layers[:N]), reference_depth, depth, ranked=True)
    return [{"layers": frozen, "set": {"visual_update": "frozen"}}]


@method
def yopo(depth, heads, window=5, heads_fraction=0.25, ffn_fraction=0.5, cut=20, full_head_layers=2, reference_depth=40,
         semantics="renorm"):
    """YOPO (arXiv 2410.06169): before layer `cut`, visual self-attention is a w x w window on the
    patch grid, only a fraction of heads touch visual tokens (all heads in the first
    `full_head_layers`), and visual tokens use the first `ffn_fraction` of FFN neurons; from `cut`
    on, visual tokens are gone. `semantics=post_softmax_zero` reproduces the released code (pruned
    columns zeroed after the softmax; visual tokens stay as never-read keys after the cut)."""
    (cut_at,) = _scaled([cut], reference_depth, depth)
    n_full = min(cut_at, round(full_head_layers * depth / reference_depth))
    kept = list(range(max(1, math.ceil(heads_fraction * heads))))
    before = list(range(cut_at))
    rules = [
        {"layers": before, "set": {"visual_self_attn": "local", "window": window, "visual_ffn": ffn_fraction,
                                   "mask_semantics": semantics}},
        {"layers": before[n_full:], "set": {"visual_heads": kept}},
    ]
    if semantics == "renorm":
        rules.append({"layers": [cut_at], "set": {"drop_visual": True}})
    else:
        rules.append({"layers": list(range(cut_at, depth)), "set": {"visual_update": "frozen", "text_reads_visual": "none",
                                                                     "mask_semantics": semantics}})
    return rules


@method
def visipruner(depth, heads, shallow=6, middle=9, exit=24, threshold=0.2, reference_depth=32, semantics="renorm"):
    """VisiPruner (arXiv 2510.17205), with static stage boundaries: layer 0 merges all text->visual
    attention onto one sink token; layers 1..shallow-1 do not let text read visual tokens; before
    `middle`, only visual tokens whose value-aware contribution to the last prompt token (in the
    previous layer) exceeds `threshold` are kept (a per-sample count); before `exit`, all visual
    tokens leave. (The paper detects the middle and exit layers per sample at run time;
    `python -m train analyze visipruner` estimates them for a model.)"""
    s, m, e = (_scaled([b], reference_depth, depth)[0] for b in (shallow, middle, exit))  # scaled one by one: they may coincide
    s = max(1, s)
    m = max(m, s + 1)
    e = max(e, m + 1)
    if e >= depth:
        raise ConfigError(f"visipruner needs at least {e + 1} layers for its stages (shallow < middle < exit), the model has {depth}")
    return [
        {"layers": [0], "set": {"text_reads_visual": "sink", "mask_semantics": semantics}},
        {"layers": list(range(1, s)), "set": {"text_reads_visual": "none", "mask_semantics": semantics}},
        {"layers": [m], "set": {"select": {"scorer": "value_aware", "source": "previous", "threshold": threshold}}},
        {"layers": [e], "set": {"drop_visual": True}},
    ]


@method
def vtw(depth, heads, K=16, reference_depth=32):
    """VTW (arXiv 2405.05803): every visual token (hidden state and KV) leaves before layer K."""
    return [{"layers": _scaled([K], reference_depth, depth, min_layer=1), "set": {"drop_visual": True}}]


@method
def fastv(depth, heads, K=2, R=0.5, reference_depth=32, per="image"):
    """FastV (arXiv 2403.06764): before layer K, drop the fraction R of visual tokens least attended
    by the last prompt token in layer K-1 (head average); `per=unit`: R of each video's time step
    (of each tile) rather than of each image or video."""
    at = _scaled([K], reference_depth, depth, min_layer=1)
    return [{"layers": at, "set": {"select": {"scorer": "attn_last", "source": "previous", "keep": 1.0 - R, "per": per}}}]


@method
def pdrop(depth, heads, layers=(8, 16, 24), ratio=0.5, reference_depth=32, positions=None, per="image", *, family="llava"):
    """PyramidDrop (arXiv 2410.17247): at each stage boundary keep `ratio` of the remaining visual
    tokens, scored by the last prompt token's attention computed with that layer's own Q/K. Its
    released code renumbers the survivors' positions (`pdrop_rank_drop` rebuilds position_ids as
    an arange over the kept tokens, decoding subtracts the dropped count): `positions=renumber`;
    `keep` gives the survivors their original positions instead (the one that applies to M-RoPE); None:
    the family's, renumber where positions are ranks (1-D RoPE), keep where they are not (M-RoPE's (t, h, w)
    triples), and the plan is then named `pdrop[positions=keep]`. `per=unit`: the budget of each video's time step."""
    if positions is None:
        positions = "renumber" if FAMILIES[family].renumbers_positions else "keep"
    at = _scaled(layers, reference_depth, depth, min_layer=1)
    rules = [{"layers": at, "set": {"select": {"scorer": "attn_last", "source": "current", "keep": ratio, "positions": positions,
                                               "per": per}}}]
    return rules + ([{"variant": "positions=keep"}] if positions == "keep" else [])


def shifted_cosine(depth: int, average: float = 0.5) -> list[float]:
    """p-MoD's retention per layer (`shifted_cos_with_ratio`): average + cos(pi * l / (depth - 1)) / 2,
    from average + 0.5 at the first layer to average - 0.5 at the last (its code's 31 is 32 layers' depth - 1)."""
    return [average + math.cos(math.pi * i / max(1, depth - 1)) / 2 for i in range(depth)]


@method
def pmod(depth, heads, max_ratio=0.85, min_ratio=0.15, average=0.5):
    """p-MoD (arXiv 2412.04449): a zero-initialised router per layer (on the layer's raw input) picks the
    visual tokens each layer processes; the others skip it, scaled by their gate (w * x, the gate
    w = 1 + 0.2 tanh(s) also weighs the kept tokens' FFN output). Retention follows a shifted cosine
    over depth (`shifted_cosine`, p-MoD's `shiftedcos_decay_0.85_0.15`); layers retaining more than
    `max_ratio` stay dense (LLaVA-1.5-7B: layers 0-7), the routed ones keep that fraction of each image's
    tokens, truncated, never below `min_ratio` (layers 8-23 decay from 0.844 to 0.156, 24-31 keep 0.15).
    No auxiliary loss."""
    return [{"layers": [i], "set": {"route": {"keep": max(r, min_ratio)}}}
            for i, r in enumerate(shifted_cosine(depth, average)) if r <= max_ratio]


@method
def gamma_mod(depth, heads, keep=0.5, first=3, reference_depth=32, aux=0.01):
    """gamma-MoD (arXiv 2410.13859) as its released code routes visual tokens: one router shared by
    every routed layer (layers `first`..L-2, all but the first three and the last of LLaVA-1.5-7B's 32)
    reads the layer's normalised input; ceil(keep * n) of each image's tokens enter, the gate
    sigmoid(s) weighs their FFN output, skipped tokens pass unchanged, and an auxiliary loss (weight
    `aux`) teaches the router which tokens were kept. Unlike the release, text is never routed (its
    decoding would skip layers and write no KV) and kept tokens keep their positions. The paper's
    negative control: at keep 0.5 LLaVA-1.5-7B falls from 55.3 to 44.4."""
    (start,) = _scaled([first], reference_depth, depth)
    route = {"keep": keep, "rounding": "ceil", "router": "shared", "router_input": "normed", "gate": "sigmoid",
             "skipped": "identity", "aux": aux}
    return [{"layers": list(range(start, depth - 1)), "set": {"route": route}}]


# The field's simple baselines (arXiv 2511.02650, 2502.11501). Keep fractions 1/3, 2/9 and 1/9 are
# LLaVA-1.5's 192 / 128 / 64 of 576 visual tokens. K=0 selects before the first layer, so the whole
# LLM sees the kept tokens (how UniPruneBench applies them); K > 0 selects before layer K, like FastV.


@method
def random(depth, heads, keep=1 / 3, K=0, seed=0, reference_depth=32, per="image"):
    """Random visual tokens before layer K: ceil(keep * n) per image (`per=unit`: per tile or time
    step), drawn per image from a local generator seeded by `seed` and the image's pixels
    (`models/blind_scores.py`): the same seed and image keep the same tokens, the global RNG is untouched."""
    return [{"layers": _scaled([K], reference_depth, depth),
             "set": {"select": {"scorer": "random", "keep": keep, "seed": seed, "per": per}}}]


@method
def uniform(depth, heads, keep=1 / 3, K=0, reference_depth=32):
    """Spatially uniform visual tokens before layer K: the ceil(keep * g^2) tokens of an even
    lattice over the g x g patch grid (`models.blind_scores.uniform_lattice`)."""
    return [{"layers": _scaled([K], reference_depth, depth), "set": {"select": {"scorer": "uniform", "keep": keep}}}]


@method
def pool(depth, heads, kernel=2, kernel_t=1):
    """`kernel` x `kernel` average pooling of the projector output before the LLM: a 24 x 24 grid
    becomes 144 tokens with kernel 2, 64 (1/9) with kernel 3; a video's steps are pooled each on its
    own (per-frame pooling), and `kernel_t` adjacent steps are merged too (temporal pooling). The pooled
    tokens take the first positions of the image span (of their first step); text positions stay as the
    prompt's n_v `<image>` tokens put them."""
    return [{"pre_llm": {"method": "pool", "kernel": kernel, **({"kernel_t": kernel_t} if kernel_t != 1 else {})}}]


@method
def temporal_pool(depth, heads, kernel_t=2):
    """Temporal pooling before the LLM: the tokens at the same row and column of `kernel_t` adjacent
    time steps of a video are averaged into one, at the first step's slot and position (images untouched)."""
    return pool(depth, heads, kernel=1, kernel_t=kernel_t)


@method
def frames(depth, heads, keep=0.5):
    """Uniform frame subsampling before the tower: of each video's t time steps the ceil(keep * t)
    of an even lattice; the tower never runs on the others (images are untouched)."""
    return [{"pre_llm": {"method": "frames", "keep": keep}}]


@method
def dominant(depth, heads, keep=1 / 3):
    """VisionZip's dominant tokens (arXiv 2412.04467) before the LLM: the ceil(keep * n_v) tokens
    the tower's CLS attends to most in its feature layer (SigLIP: the most attended on average);
    VisionZip's merged contextual tokens are not built."""
    return [{"pre_llm": {"method": "dominant", "keep": keep}}]


@method
def rules(depth, heads, *items):
    """Hand-written rules: `[{layers: [..] | all, reference_depth: D, ranked: bool, from_layer: i, set: {...}}]`."""
    return [dict(r) for r in items]


def load_arch(arch: dict[str, Any]) -> dict[str, Any]:
    """An arch config, reading it from `path` when it points at a plan file."""
    arch = dict(arch or {})
    if arch.get("path"):
        path = Path(arch["path"]).expanduser()
        if not path.is_file():
            raise ConfigError(f"arch.path={str(path)!r}: no such plan file")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"plan file {path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a plan file holds a mapping (methods / layers / pre_llm / name)")
        loaded.setdefault("name", path.stem)
        return loaded
    return arch


def arch_name(arch: dict[str, Any] | None, variants: dict[str, str] | None = None) -> str:
    """`vica`, `vica+pdrop`, `cls_knee`, `dense`, ...: the plan's name (also names run directories);
    `own_plan` without an arch (a checkpoint evaluated under the plan it carries). `variants`: how a
    method departs from its paper for this model (`pdrop[positions=keep]`; the resolved plan's name only)."""
    if arch is None:
        return "own_plan"
    arch = load_arch(arch)
    variants = variants or {}
    methods = [f"{m}[{variants[m]}]" if m in variants else m for m in arch.get("methods") or {}]
    names = methods + ([arch["pre_llm"].get("method", "cls_knee")] if arch.get("pre_llm") else [])
    return arch.get("name") or "+".join(names) or ("explicit" if arch.get("layers") else "dense")


def resolve_arch(arch: dict[str, Any], num_layers: int, num_heads: int, family: str = "llava",
                 layer_types: list[str] | None = None) -> Plan:
    """The resolved plan of an `arch` config: `{methods: {name: knobs}, pre_llm: {...}, layers: [...]}`,
    for a model of `family` (builders that take the paper's per-model choices read it) whose layers are
    of `layer_types` (a hybrid LLM's: attention-scored selections move after a full-attention layer,
    models.layer_kinds.place_scored_selections; None: all full attention)."""
    arch = load_arch(arch)
    check_keys(arch, {"methods", "pre_llm", "layers", "name"}, "arch")
    all_rules: dict[str, Rule] = {}
    variants: dict[str, str] = {}
    pre_llm = {"arch.pre_llm": arch["pre_llm"]} if arch.get("pre_llm") else {}
    for name, knobs in (arch.get("methods") or {}).items():
        if name not in PLAN_BUILDERS:
            check_keys({name: 0}, set(PLAN_BUILDERS), "arch.methods")
        builder = PLAN_BUILDERS[name]
        if name == "rules":
            built = builder(num_layers, num_heads, *(knobs or []))
        else:
            knobs = dict(knobs or {})
            check_keys(knobs, set(knobs_of(builder)), f"arch.methods.{name}")
            if "family" in inspect.signature(builder).parameters:
                knobs["family"] = family
            try:
                built = builder(num_layers, num_heads, **knobs)
            except ConfigError as e:
                raise ConfigError(f"arch.methods.{name}: {e}") from None
        for j, r in enumerate(built):
            if "variant" in r:
                variants[name] = r["variant"]
            elif "pre_llm" in r:
                try:
                    PreSelect(**r["pre_llm"])
                except ConfigError as e:
                    raise ConfigError(f"arch.methods.{name}: {e}") from None
                pre_llm[f"arch.methods.{name}"] = r["pre_llm"]
            else:
                all_rules[f"{name}[{j}]"] = r
    if len(pre_llm) > 1:
        raise ConfigError(f"{' and '.join(pre_llm)} each set the step before the LLM; a plan has at most one, keep one of them")
    spec = {"name": arch_name(arch, variants), "rules": all_rules, "pre_llm": next(iter(pre_llm.values()), None), "layers": arch.get("layers")}
    plan = plan_from_rules(spec, num_layers, num_heads)
    if layer_types is None:
        return plan
    plan = place_scored_selections(plan, tuple(layer_types))
    plan.validate(num_heads)
    return plan
