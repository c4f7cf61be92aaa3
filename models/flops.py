"""Analytic FLOPs of a resolved plan: exactly the matmuls the physical engine runs.

Counts follow the engine (decoder layers only, like the papers): per layer, text rows' Q/K/V/O
and FFN; visual K/V where someone reads them (only the KV heads a head mask keeps); visual Q/O and
FFN where visual tokens are updated (kept heads, kept FFN neurons); attention as
4 * heads * queries * keys * head_dim for every (query group, key set) the engine forms (no causal
halving, like the papers and like FlopCounterMode on SDPA); scoring probes for token selection;
gated cross-attention blocks; routers (`LayerPolicy.route`: a Linear(d, 1) over every visual token
present, then the layer on text and the tokens each image's budget lets in). Gated attention (Qwen3.5)
writes a query and an output gate per head from `q_proj`: twice the query projection.
Linear-attention layers (Gated DeltaNet, `LinearShape`, terms named `linear:*`): the input projections
(query/key/value channels and the two gates a, b) of every token in the recurrence, the depthwise conv
over them, the delta rule as the prefill kernel runs it (chunks of 64, a sample padded to whole chunks:
per chunk and value head 4 C^2 dk + 2 C^2 dv for the intra-chunk products, C (C - 1) (dk + dv) for the two
unit-triangular solves, 6 C dk dv against the state), and the output gate z, gated norm projection and
out_proj of the tokens that get an output. Elementwise work (norms, activations, decays) is not counted,
in either kind of layer. `by_layer_kind` splits a count into the linear layers' and the rest.
Conventions (the papers count differently, so each is explicit):
  convention: `2mac` (FLOPs) or `mac` (multiply-accumulates, VisiPruner);
  scope: `total` (every token: ShortV/FastV tables), `visual_side` (total minus the same model
         on text alone: ViCA), `visual` (visual rows only: projections, FFN and visual-to-visual
         attention: VisiPruner);
  ffn: `swiglu` (3 matrices) or `2mat` (FastV-style 2-matrix MLP).
`tests/test_flops.py` checks the `total` count against `torch.utils.flop_counter.FlopCounterMode`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace

from .plan import LayerPolicy, Plan, PreSelect, Select
from .selection import ceil_budget, frame_steps

TEXT_ONLY_TERMS = {"text_proj", "text_ffn", "text_attn_text", "linear:text_proj", "linear:text_mix", "linear:text_ffn"}
VISUAL_TERMS = {"vis_kv_proj", "vis_qo_proj", "vis_attn_vis", "vis_ffn", "router", "linear:vis_in", "linear:vis_mix", "linear:vis_out",
                "linear:vis_ffn"}
GATED_ATTENTION = ("qwen3_5_text", "qwen3_5_moe_text")  # text model types whose q_proj writes a query and an output gate per head


@dataclass(frozen=True)
class Shape:
    d: int  # hidden size
    m: int  # FFN intermediate size (of the dense layers)
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    moe: "MoeShape | None" = None  # mixture-of-experts layers, if any
    gated: bool = False  # gated attention: q_proj writes each head's query and its output gate
    linear: "LinearShape | None" = None  # linear-attention layers, if any (Qwen3.5)

    @staticmethod
    def from_hf(text_config) -> "Shape":
        from .layer_kinds import LINEAR, layer_kinds
        from .moe import moe_layers

        t = text_config
        h = t.num_attention_heads
        dh = getattr(t, "head_dim", None) or t.hidden_size // h
        sparse = moe_layers(t)
        moe = MoeShape(t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size, tuple(sparse),
                       getattr(t, "shared_expert_intermediate_size", 0) or 0) if any(sparse) else None
        kinds = layer_kinds(t)
        linear = LinearShape(t.linear_num_key_heads, t.linear_key_head_dim, t.linear_num_value_heads, t.linear_value_head_dim,
                             t.linear_conv_kernel_dim, tuple(k == LINEAR for k in kinds)) if LINEAR in kinds else None
        m = getattr(t, "intermediate_size", None) or moe.shared  # Qwen3.5-MoE has no dense MLP: gated blocks get the shared width
        return Shape(t.hidden_size, m, t.num_hidden_layers, h, t.num_key_value_heads, dh, moe, t.model_type in GATED_ATTENTION, linear)

    def ffn_per_token(self, layer: int, ffn_mats: int) -> int:
        """FFN FLOPs of one token in `layer`: the dense MLP, or an MoE layer's *active* parameters (the
        router's logits over every expert, then its top-k experts' SwiGLU, and a shared expert with its
        gate where the block has one)."""
        if self.moe is not None and self.moe.layers[layer]:
            shared = 3 * 2 * self.d * self.moe.shared + 2 * self.d if self.moe.shared else 0
            return 2 * self.d * self.moe.experts + self.moe.top_k * 3 * 2 * self.d * self.moe.m + shared
        return ffn_mats * 2 * self.d * self.m

    def is_linear(self, layer: int) -> bool:
        return self.linear is not None and self.linear.layers[layer]


@dataclass(frozen=True)
class MoeShape:
    experts: int
    top_k: int  # experts per token
    m: int  # each expert's intermediate size
    layers: tuple[bool, ...]  # which decoder layers are sparse
    shared: int = 0  # the shared expert's intermediate size (0: none)


@dataclass(frozen=True)
class LinearShape:
    """Gated DeltaNet layers: query/key heads and their size, value heads and theirs, the conv's taps,
    the prefill kernel's chunk and which decoder layers are linear."""

    key_heads: int
    key_dim: int
    value_heads: int
    value_dim: int
    conv: int
    layers: tuple[bool, ...]
    chunk: int = 64  # transformers' torch_chunk_gated_delta_rule (and flash-linear-attention's) chunk size

    @property
    def channels(self) -> int:
        """The conv's channels: queries, keys and values."""
        return 2 * self.key_heads * self.key_dim + self.value_heads * self.value_dim

    def rule(self, n: int) -> int:
        """The chunked delta rule over one sample of `n` tokens (padded to whole chunks), every value head."""
        c, dk, dv = self.chunk, self.key_dim, self.value_dim
        chunks = -(-n // c)
        return self.value_heads * chunks * (4 * c * c * dk + 2 * c * c * dv + c * (c - 1) * (dk + dv) + 6 * c * dk * dv)

    def step(self) -> int:
        """One decoded token's recurrent step (read, delta and write against the state), every value head."""
        return self.value_heads * 6 * self.key_dim * self.value_dim

def _proj(n: int, d_in: int, d_out: int) -> int:
    return 2 * n * d_in * d_out


def layer_terms(s: Shape, p: LayerPolicy, n_t: int, n_v: int, n_v_next: int | None, ffn_mats: int, score_next: bool,
                n_v_xattn: int, past: int = 0, layer: int = 0) -> tuple[Counter, int]:
    """FLOPs (2xMAC) per term of one layer and the visual tokens it leaves for the next one.

    `n_v`: visual tokens entering the layer (after this layer's own pre-layer drop/select).
    `n_v_next`: for source=current selection, the tokens kept inside this layer.
    `past`: cached keys before the new text tokens (decode); `layer`: its index (MoE layers' FFN).
    """
    t = Counter()
    dq, dkv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    ffn = s.ffn_per_token(layer, ffn_mats)
    if p.xattn:  # the block's own MLP is dense
        t["xattn"] += _proj(n_t, s.d, dq) + _proj(n_t, dq, s.d) + n_t * ffn_mats * 2 * s.d * s.m + 4 * s.heads * n_t * n_v_xattn * s.head_dim
        if past == 0:
            t["xattn"] += 2 * _proj(n_v_xattn, s.d, dkv)
    if s.is_linear(layer):
        t.update(linear_layer_terms(s, p, n_t, n_v, ffn, ffn_mats, past))
        return t, n_v
    q_width = 2 if s.gated else 1  # gated attention: a query and an output gate per head
    t["text_proj"] += _proj(n_t, s.d, q_width * dq) + 2 * _proj(n_t, s.d, dkv) + _proj(n_t, dq, s.d)
    t["text_ffn"] += n_t * ffn
    sees = n_v > 0 and (p.text_reads or p.mask_semantics == "post_softmax_zero")
    update = n_v > 0 and p.updates_visual
    heads = list(p.visual_heads) if p.visual_heads is not None else list(range(s.heads))
    if sees or update:
        kv_heads = s.kv_heads if (p.visual_heads is None or p.mask_semantics == "post_softmax_zero") else len({h * s.kv_heads // s.heads for h in heads})
        t["vis_kv_proj"] += 2 * _proj(n_v, s.d, kv_heads * s.head_dim)
    if p.select is not None and p.select.source == "current" and n_v_next is not None:
        t["probe"] += _proj(1, s.d, q_width * dq) + 2 * s.heads * (n_t + n_v) * s.head_dim  # last query's Q and logits
        n_v = n_v_next  # the kept tokens' K/V are gathered, not recomputed
        sees = n_v > 0 and sees
        update = n_v > 0 and update
    keys = past + n_t + (n_v if sees else 0)
    t["text_attn_text"] += 4 * s.heads * n_t * (past + n_t) * s.head_dim
    if sees:
        t["text_attn_vis"] += 4 * s.heads * n_t * n_v * s.head_dim
    if score_next:
        t["probe"] += 2 * s.heads * keys * s.head_dim
    if update:
        k = len(heads)
        t["vis_qo_proj"] += _proj(n_v, s.d, q_width * k * s.head_dim) + _proj(n_v, k * s.head_dim, s.d)
        if p.visual_self_attn == "full":
            vis_keys = n_v
        elif p.visual_self_attn == "local":
            vis_keys = p.window**2
        else:
            vis_keys = 1
        t["vis_attn_text"] += 4 * k * n_v * n_t * s.head_dim
        t["vis_attn_vis"] += 4 * k * n_v * vis_keys * s.head_dim
        t["vis_ffn"] += _visual_ffn(s, p, n_v, ffn, ffn_mats)
    return t, n_v


def _visual_ffn(s: Shape, p: LayerPolicy, n_v: int, ffn: int, ffn_mats: int) -> int:
    """The FFN of `n_v` updated visual tokens: all of it, or YOPO's neuron fraction (dense MLPs only)."""
    if p.visual_ffn >= 1:
        return n_v * ffn
    if p.visual_ffn > 0:
        return n_v * ffn_mats * 2 * s.d * max(1, round(p.visual_ffn * s.m))
    return 0


def linear_layer_terms(s: Shape, p: LayerPolicy, n_t: int, n_v: int, ffn: int, ffn_mats: int, past: int = 0) -> Counter:
    """A linear-attention layer's FLOPs (models/linear_attention.py): every token in the recurrence (text, and
    visual tokens unless text does not read them) pays its input projections, its conv channels and its
    share of the delta rule; the tokens that get an output (text, visual tokens unless frozen) pay the
    output gate, the gated norm's out_proj and the FFN. `past` > 0: decoding `n_t` new tokens, each one
    recurrent step (the cache is a fixed-size state, whatever came before)."""
    lin, t = s.linear, Counter()
    inputs = _proj(1, s.d, lin.channels + 2 * lin.value_heads)  # query/key/value channels, the gates a and b
    outputs = 2 * _proj(1, s.d, lin.value_heads * lin.value_dim)  # z and out_proj
    conv = 2 * lin.channels * lin.conv
    t["linear:text_proj"] += n_t * (inputs + outputs)
    t["linear:text_ffn"] += n_t * ffn
    if past:
        t["linear:text_mix"] += n_t * (conv + lin.step())
        return t
    feeds = n_v > 0 and p.text_reads  # visual tokens in the recurrence
    n_in = n_t + (n_v if feeds else 0)
    mix = lin.rule(n_in) + n_in * conv
    visual = mix * n_v // n_in if feeds else 0  # the visual tokens' share of the sequence's work
    t["linear:text_mix"] += mix - visual
    if feeds:
        t["linear:vis_in"] += n_v * inputs
        t["linear:vis_mix"] += visual
        if p.updates_visual:
            t["linear:vis_out"] += n_v * outputs
            t["linear:vis_ffn"] += _visual_ffn(s, p, n_v, ffn, ffn_mats)
    return t


def by_layer_kind(terms: Counter) -> dict[str, int]:
    """A count split into the linear-attention layers' own work and everything else (full-attention
    layers, and what runs between layers: routers, gated cross-attention blocks)."""
    linear = sum(v for k, v in terms.items() if k.startswith("linear:"))
    return {"linear_attention": linear, "full_attention": sum(terms.values()) - linear}


@dataclass(frozen=True)
class ImageTokens:
    """One image's visual tokens as the FLOPs model needs them: the grid cells of each unit (an
    image, or a tile) and the tokens off the grids: layout tokens (LLaVA-NeXT's newlines, which
    every selection keeps) and selectable ones (a kept CLS). Counts follow the engine's rules
    (models/selection.py): budgets per image, uniform lattices and pooling per unit."""

    units: tuple[tuple[tuple[int, int], ...], ...]  # per unit, its (row, col) cells
    extra: int = 0  # layout tokens
    off_grid: int = 0  # selectable tokens on no grid
    times: tuple[int, ...] = ()  # per unit, its video time step (a video's steps are units; empty: all at 0)

    @staticmethod
    def square(n_visual: int) -> "ImageTokens":
        """`n_visual` tokens: a square grid when n_visual is a square number (LLaVA-1.5), else one
        token off it (a kept CLS) plus the square grid below."""
        g = math.isqrt(n_visual)
        off = n_visual - g * g
        return ImageTokens((tuple((r, c) for r in range(g) for c in range(g)),), 0, off)

    @staticmethod
    def from_places(places) -> "ImageTokens":
        """From one image's places [n, len(Place)] (a family's layout for an image size)."""
        from .streams import Place

        units: dict[int, list[tuple[int, int]]] = {}
        times: dict[int, int] = {}
        extra = off = 0
        for row in places.tolist():
            if row[Place.EXTRA]:
                extra += 1
            elif row[Place.ROW] < 0:
                off += 1
            else:
                units.setdefault(row[Place.UNIT], []).append((row[Place.ROW], row[Place.COL]))
                times[row[Place.UNIT]] = row[Place.TIME]
        time = tuple(times[u] for u in sorted(units)) if any(times.values()) else ()
        return ImageTokens(tuple(tuple(cells) for _, cells in sorted(units.items())), extra, off, time)

    @property
    def selectable(self) -> int:
        return sum(len(u) for u in self.units) + self.off_grid

    @property
    def n(self) -> int:
        return self.selectable + self.extra

    def pre_llm(self, pre: PreSelect, pre_llm_keep: float) -> int | None:
        """Tokens entering the LLM after a pre-LLM step (None when data-dependent: CLS knee)."""
        times = self.times or (0,) * len(self.units)
        if pre.method == "pool":  # windows per (tile, group of kernel_t steps, row // k, col // k)
            kt = pre.kernel_t or 1
            cells = {(k - t, t // kt, r // pre.kernel, c // pre.kernel) for k, (u, t) in enumerate(zip(self.units, times)) for r, c in u}
            return len(cells) + self.off_grid + self.extra
        if pre.method == "frames":  # the kept steps' cells
            kept = set(frame_steps(len(set(times)), pre.keep))
            return sum(len(u) for u, t in zip(self.units, times) if t in kept) + self.off_grid + self.extra
        if pre.method == "dominant":
            return ceil_budget(pre.keep, self.selectable, pre.min_keep) + self.extra
        return None

    def uniform(self, sel: Select) -> int:
        return sum(ceil_budget(sel.keep, len(u), sel.min_keep) for u in self.units) + self.extra


def selected_count(p: LayerPolicy, n_v: int, threshold_keep: float, extra: int = 0) -> int:
    """Visual tokens kept by a selection of `n_v` present tokens (`extra` of them layout tokens,
    always kept): the budget, or an assumed fraction for thresholds."""
    n = n_v - extra
    if p.select.keep is not None:
        return p.select.budget(n) + extra
    return max(min(p.select.min_keep, n), round(threshold_keep * n)) + extra


def plan_terms(s: Shape, plan: Plan, n_visual: "int | ImageTokens", n_text: int, ffn: str = "swiglu", threshold_keep: float = 0.018,
               pre_llm_keep: float = 0.22, counts: dict[int, int] | None = None) -> tuple[Counter, list[int]]:
    """Prefill FLOPs per term summed over layers, and the visual tokens present in each layer.

    `n_visual`: the visual tokens of a sample, as a count (one square grid, LLaVA-1.5) or as an
    `ImageTokens` layout (LLaVA-NeXT: tiles and newlines; `Family.image_tokens`).
    A pre-LLM step (pooling, dominant tokens, CLS knee) sets the visual tokens of every layer.
    Data-dependent token counts (threshold selection, CLS knee) use assumed fractions
    (`threshold_keep`: VisiPruner's 10.3 of 576 tokens; `pre_llm_keep`: 2409.01162's 22%) unless
    `counts` gives the measured count after each layer's selection (key -1: after the pre-LLM step).
    The pre-LLM step's own work (pooling, the tower's dominance scores) is outside the decoder and
    not counted.
    """
    counts = counts or {}
    ffn_mats = {"swiglu": 3, "2mat": 2}[ffn]
    image = n_visual if isinstance(n_visual, ImageTokens) else ImageTokens.square(n_visual)
    extra = image.extra if n_visual else 0
    n_v = image.n if n_visual else 0
    if plan.pre_llm is not None and n_v:
        exact = image.pre_llm(plan.pre_llm, pre_llm_keep)
        fallback = max(plan.pre_llm.min_keep, round(pre_llm_keep * image.selectable)) + extra
        n_v = counts.get(-1, exact if exact is not None else fallback)
    n_v0 = n_v

    def selected(p: LayerPolicy, n: int) -> int:
        if p.select.scorer == "uniform" or (p.select.per_unit and n == n_v0 == image.n):  # the full grid: a budget per unit
            return image.uniform(p.select)
        return selected_count(p, n, threshold_keep, min(extra, n))
    total, present = Counter(), []
    for i, p in enumerate(plan.layers):
        nxt = plan.layers[i + 1] if i + 1 < len(plan.layers) else None
        score_next = nxt is not None and nxt.select is not None and nxt.select.scores_previous_layer
        if p.drop_visual:
            n_v = 0
        elif p.select is not None and p.select.source == "previous":
            n_v = counts.get(i, selected(p, n_v)) if n_v else 0
        kept = counts.get(i, selected(p, n_v)) if (p.select is not None and p.select.source == "current" and n_v) else None
        if kept is not None and p.select.positions == "renumber":
            # scored by a probe (this layer's K of every token, the last token's Q and logits), then the
            # layer runs on the survivors at their new positions: as a layer without a selection
            total["probe"] += _proj(n_text + n_v, s.d, s.kv_heads * s.head_dim) + _proj(1, s.d, (2 if s.gated else 1) * s.heads * s.head_dim)
            total["probe"] += 2 * s.heads * (n_text + n_v) * s.head_dim
            p, n_v, kept = replace(p, select=None), kept, None
        if p.route is not None and n_v:  # routed-out tokens skip this layer only
            total["router"] += _proj(n_v, s.d, 1)
            entering = p.route.budget(n_v - min(extra, n_v)) + min(extra, n_v)
            terms, _ = layer_terms(s, p, n_text, entering, kept, ffn_mats, score_next and n_v > 0, n_v0, layer=i)
            present.append(entering)
        else:
            terms, n_v = layer_terms(s, p, n_text, n_v, kept, ffn_mats, score_next and n_v > 0, n_v0, layer=i)
            present.append(n_v)
        total.update(terms)
    return total, present


def scope_flops(terms: Counter, scope: str, text_only: Counter | None = None) -> int:
    if scope == "total":
        return sum(terms.values())
    if scope == "visual":
        return sum(v for k, v in terms.items() if k in VISUAL_TERMS)
    if scope == "visual_side":
        return sum(terms.values()) - sum((text_only or Counter()).values())
    raise ValueError(f"unknown FLOPs scope {scope!r} (total, visual_side, visual)")


def prefill_flops(s: Shape, plan: Plan, n_visual: int, n_text: int, convention: str = "2mac", scope: str = "total",
                  ffn: str = "swiglu", **kw) -> float:
    """Prefill FLOPs of one sample in the given convention and scope."""
    terms, _ = plan_terms(s, plan, n_visual, n_text, ffn, **kw)
    text_only, _ = plan_terms(s, Plan.dense(s.layers), 0, n_text, ffn)
    return convert(scope_flops(terms, scope, text_only), convention)


def decode_flops(s: Shape, plan: Plan, n_visual: int, n_text: int, convention: str = "2mac", ffn: str = "swiglu", **kw) -> float:
    """FLOPs of the first generated token: one text query per layer over that layer's cached keys."""
    _, present = plan_terms(s, plan, n_visual, n_text, ffn, **kw)
    ffn_mats = {"swiglu": 3, "2mat": 2}[ffn]
    n_v0 = present[0] if present else 0
    total = 0
    for i, p in enumerate(plan.layers):
        cached_vis = present[i] if (p.text_reads or p.mask_semantics == "post_softmax_zero") else 0
        terms, _ = layer_terms(s, _decode_policy(p), 1, 0, None, ffn_mats, False, n_v0, past=n_text + cached_vis, layer=i)
        total += sum(terms.values())
    return convert(total, convention)


def _decode_policy(p: LayerPolicy) -> LayerPolicy:
    """At decode only text queries run; visual keys are already in the cache (counted via `past`)."""
    return LayerPolicy(xattn=p.xattn)


def kv_cache_bytes(s: Shape, plan: Plan, n_visual: int, n_text: int, bytes_per_value: int = 2, **kw) -> int:
    """Prefill KV-cache size per sample: text keys in every full-attention layer, visual keys only where read;
    a linear-attention layer's fixed-size conv window and state."""
    _, present = plan_terms(s, plan, n_visual, n_text, **kw)
    keys = state = 0
    for i, p in enumerate(plan.layers):
        if p.xattn:
            keys += present[0] if present else 0
        if s.is_linear(i):  # a fixed-size cache: the conv's last inputs and the delta rule's state (fp32)
            lin = s.linear
            state += lin.channels * (lin.conv - 1) * bytes_per_value + lin.value_heads * lin.key_dim * lin.value_dim * 4
            continue
        keys += n_text + (present[i] if (p.text_reads or p.mask_semantics == "post_softmax_zero") else 0)
    return keys * 2 * s.kv_heads * s.head_dim * bytes_per_value + state


def convert(flops: int, convention: str) -> float:
    if convention not in ("2mac", "mac"):
        raise ValueError(f"unknown FLOPs convention {convention!r} (2mac or mac)")
    return flops / 2 if convention == "mac" else float(flops)


def measure_flops(fn, *args, **kwargs) -> tuple[int, object]:
    """Run `fn` under `torch.utils.flop_counter.FlopCounterMode`; returns (FLOPs, result).

    PyTorch has no FLOP formula for the CPU flash-attention kernel that SDPA dispatches to, so it
    would count attention as zero on CPU; we register the same formula it uses for the CUDA kernels.
    Nor for `_grouped_mm`, transformers' default kernel for fused MoE experts: every output element is
    a dot product over the inner dimension, 2 * out.numel() * inner FLOPs. Nor for triangular solves
    (the delta rule's chunked kernel): forward substitution, n (n - 1) FLOPs per right-hand side of a
    unit-triangular n x n system (n^2 otherwise).
    """
    import torch
    from torch.utils import flop_counter

    cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if cpu_sdpa not in flop_counter.flop_registry:

        def cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

        flop_counter.register_flop_formula(cpu_sdpa)(cpu_sdpa_flop)
    grouped = torch.ops.aten._grouped_mm
    if grouped not in flop_counter.flop_registry:

        def grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs):
            return 2 * math.prod(out_shape) * a_shape[-1]

        flop_counter.register_flop_formula(grouped)(grouped_mm_flop)
    solve = torch.ops.aten.linalg_solve_triangular
    if solve not in flop_counter.flop_registry:  # the delta rule's chunked kernel (Qwen3.5's linear-attention layers)

        def solve_flop(a_shape, b_shape, *args, out_shape=None, left=True, unitriangular=False, **kwargs):
            n = a_shape[-1]
            columns = math.prod(out_shape) // n  # right-hand sides, batch included
            return columns * n * (n - 1 if unitriangular else n)  # forward substitution: n (n - 1) / 2 MACs per column

        flop_counter.register_flop_formula(solve)(solve_flop)
    with flop_counter.FlopCounterMode(display=False) as counter:
        result = fn(*args, **kwargs)
    return counter.get_total_flops(), result
