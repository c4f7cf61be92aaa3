"""The decoder forward, owned by us, over the modules and weights of an HF Llama/Qwen2 model.

Each layer follows its `LayerPolicy` by choosing *which tokens* take part, never by masking a full
sequence: text tokens are always queries; visual tokens are queries only where they are updated
(and then only in the heads they keep, with the FFN neurons they keep); visual keys/values exist
only where someone reads them; token-set changes gather the visual stream. Decoding runs over the keys
this module caches, in models/decoding.py.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import (
    Keys,
    apply_rope,
    attend,
    attend_eager,
    attend_visual,
    causal_mask,
    expand_kv,
    gated,
    grid_neighbours,
    has_output_gate,
    head_visual_mask,
    last_query_probs,
    merge_heads,
    sequence_order,
    split_heads,
)
from .blind_scores import blind_scores
from .decoding import decode_layer
from .packed_attention import causal_attention
from .layer_kinds import FULL, LINEAR
from .linear_attention import RecurrentState, decode_linear_layer, run_linear_layer
from .lora import linear_weight
from .moe import RouterLogits, feed_forward
from .plan import LayerPolicy, Plan, Select
from .routing import Routing
from .selection import compact, keep_best, row_groups
from .host_sizes import VisualCounts
from .streams import Place, RopeTable, Stream, empty_like_visual, injected, present_count, renumbered


# --- projections restricted to heads / neurons -------------------------------------------------


def head_columns(heads: list[int], head_dim: int, device) -> Tensor | slice:
    """The features of heads `heads` in a projection's output: a slice when they are consecutive (YOPO's),
    else their indices (on `device`)."""
    if list(heads) == list(range(heads[0], heads[0] + len(heads))):
        return slice(heads[0] * head_dim, (heads[0] + len(heads)) * head_dim)
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], device=device)


def head_numbers(heads: list[int], device) -> Tensor:
    """[len(heads)] the head numbers on `device` (consecutive ones by `arange`: nothing copied from the host)."""
    if list(heads) == list(range(heads[0], heads[0] + len(heads))):
        return torch.arange(heads[0], heads[0] + len(heads), device=device)
    return torch.tensor(list(heads), device=device)


def _rows(linear: nn.Linear, heads: list[int] | None, head_dim: int) -> tuple[Tensor, Tensor | None]:
    """Weight (and bias) rows of the given output heads (all when `heads` is None)."""
    w, b = linear_weight(linear)  # W + LoRA delta when an adapter wraps the linear
    if heads is None:
        return w, b
    idx = head_columns(heads, head_dim, w.device)
    return w[idx], None if b is None else b[idx]


def project_heads(linear: nn.Linear, x: Tensor, heads: list[int] | None, head_dim: int, norm: nn.Module | None = None) -> Tensor:
    """The projection's output heads `heads` only (all heads: the module itself, so adapters such
    as LoRA that wrap it apply), then `norm` per head if given (Qwen3's q_norm / k_norm, which act
    on each head's vector before RoPE, so they commute with the head subset)."""
    if heads is None:
        out = split_heads(linear(x), head_dim)
    else:
        w, b = _rows(linear, heads, head_dim)
        out = split_heads(F.linear(x, w, b), head_dim)
    return out if norm is None else norm(out)


def project_queries(attn: nn.Module, x: Tensor, heads: list[int] | None, head_dim: int, norm: nn.Module | None = None
                    ) -> tuple[Tensor, Tensor | None]:
    """The queries [B, H, N, dh] of heads `heads` (all when None), normed per head, and their output
    gate under gated attention (models/attention.py `has_output_gate`; the head's output is multiplied
    by sigmoid(gate) before `o_proj`: `gated`); None for ungated attention."""
    if not has_output_gate(attn):
        return project_heads(attn.q_proj, x, heads, head_dim, norm), None
    q, gate = project_heads(attn.q_proj, x, heads, 2 * head_dim).split(head_dim, dim=-1)
    return (q if norm is None else norm(q)), gate


def output_heads(o_proj: nn.Linear, out: Tensor, heads: list[int] | None, head_dim: int) -> Tensor:
    """o_proj over the given heads only (columns of W_o): pruned heads contribute nothing."""
    if heads is None:
        return o_proj(merge_heads(out))
    idx = head_columns(heads, head_dim, out.device)
    w, b = linear_weight(o_proj)
    return F.linear(merge_heads(out), w[:, idx], b)


# --- token selection --------------------------------------------------------------------------


def select_visual(vis: Stream, scores: Tensor, sel: Select, width: int | None = None) -> tuple[Stream, Tensor]:
    """Keep the best-scoring visual tokens of each image (of each unit, a tile or a video's time step,
    for `per=unit` and `uniform`), layout tokens always (models/selection.py); original order kept,
    rows may keep different counts (padded with `valid=False`) in a stream `width` wide (the host's
    count; None: read back). Returns the kept stream and its indices."""
    if vis.n == 0:
        return vis, vis.valid.new_zeros(vis.valid.shape, dtype=torch.long)
    groups = row_groups(vis.image, vis.at(Place.UNIT)) if sel.per_unit else row_groups(vis.image)
    keep = keep_best(scores, groups, vis.valid & ~vis.extra, vis.valid & vis.extra, keep=sel.keep, threshold=sel.threshold,
                     min_keep=sel.min_keep)
    index, valid = compact(keep, width)
    return vis.gather(index, valid), index


def select_before_layer(vis: Stream, sel: Select, attention_scores: Tensor | None, image_keys: Tensor | None,
                        width: int | None = None) -> Stream:
    """The visual tokens a layer keeps under a selection made before it: scored by the previous
    layer's attention (`attention_scores`), or by a scorer that reads none (random, uniform)."""
    scores = attention_scores if sel.reads_attention else blind_scores(sel, vis, image_keys)
    return select_visual(vis, scores, sel, width)[0]


def visual_scores(probs: Tensor, keys: Keys, vis_cols: Tensor, scorer: str, vis_query: Tensor | None = None) -> Tensor:
    """Per-visual-token scores [B, V] from the scoring queries' attention `probs` [B, H, Q, S] (one
    query per row, or one per sample of a packed row); `vis_cols` [B, V]: the key column of each
    visual-stream token, `vis_query` [B, V]: the query that scores it (its own sample's; None: the one)."""
    h, n_keys = probs.shape[1], probs.shape[3]
    column = vis_cols if vis_query is None else vis_query * n_keys + vis_cols
    p = torch.gather(probs.flatten(2), 2, column[:, None].expand(-1, h, -1))  # [B, H, V]
    if scorer == "attn_last":
        return p.mean(1)
    v = expand_kv(keys.v, h)
    v = torch.gather(v, 2, vis_cols[:, None, :, None].expand(-1, h, -1, v.shape[-1]))  # [B, H, V, dh]
    return (p.unsqueeze(-1) * v).pow(2).sum((1, 3)).sqrt()  # ||concat_h P[last, j] V_j||


def scoring_rows(query_idx: Tensor) -> Tensor:
    """[B, Q] text-stream indices of the tokens that score visual tokens: `query_idx` [B] (one per row)
    or [B, Q] (one per sample of a packed row, models/mllm.py `sample_query_index`)."""
    return query_idx[:, None] if query_idx.dim() == 1 else query_idx


def take_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x [B, N, ...] at the token indices `index` [B, Q] -> [B, Q, ...]."""
    return torch.gather(x, 1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


def take_heads(x: Tensor, index: Tensor) -> Tensor:
    """x [B, H, N, ...] at the token indices `index` [B, Q] -> [B, H, Q, ...]."""
    idx = index[:, None].view(index.shape[0], 1, index.shape[1], *([1] * (x.dim() - 3)))
    return torch.gather(x, 2, idx.expand(-1, x.shape[1], -1, *x.shape[3:]))


def query_of_visual(vis_start: Tensor | None, q_start: Tensor | None) -> Tensor | None:
    """[B, V] which scoring query belongs to each visual token's sample (None: unpacked rows, one query)."""
    if vis_start is None or q_start is None:
        return None
    return (vis_start[:, :, None] == q_start[:, None, :]).int().argmax(-1)


def last_columns(keys: Keys, n: int) -> Tensor:
    """[B, n] column indices of the last `n` keys (the visual ones, appended after the text keys)."""
    return torch.arange(keys.n - n, keys.n, device=keys.k.device).expand(keys.k.shape[0], -1)


# The policy fields the one-sequence path handles at other values than dense's, each with the values
# it handles: `run_decoder` applies them *before* the layer, which then treats the visual tokens
# present like text. Every other field must keep its dense default, so a field added to
# `LayerPolicy` turns the fast path off until it is listed here (tests/test_policy_fields.py).
ONE_SEQUENCE_FIELDS: dict[str, Callable[[object], bool]] = {
    "select": lambda s: s is None or s.source == "previous",  # chosen before the layer; source=current selects inside it
    "drop_visual": lambda drop: True,  # the visual stream is emptied before the layer
    "xattn": lambda block: True,  # the gated block runs on the text stream before the layer
    "route": lambda route: True,  # the router's tokens are chosen before the layer, which weighs their FFN output
}


def runs_as_one_sequence(p: LayerPolicy) -> bool:
    """The layer treats visual tokens exactly like text (dense, or after a previous-layer selection):
    it is HF's own layer on the tokens present, so it runs on them as one causal sequence. Derived
    from the dataclass fields: each one equals its dense default or is handled (ONE_SEQUENCE_FIELDS)."""
    return all(
        ONE_SEQUENCE_FIELDS[f.name](getattr(p, f.name)) if f.name in ONE_SEQUENCE_FIELDS else getattr(p, f.name) == f.default
        for f in fields(p)
    )


# --- one layer ---------------------------------------------------------------------------------


class LayerIO(NamedTuple):
    text: Stream
    vis: Stream
    keys: Keys | RecurrentState  # what text queries attended to, or a linear layer's recurrent state (cached for decode)
    scores: Tensor | None = None  # scores for the next layer's selection
    router: tuple[RouterLogits, ...] = ()  # MoE layers: the router logits of the tokens its FFN processed


class PlannedDecoderLayer(nn.Module):
    """One decoder layer of the HF LLM, run under a `LayerPolicy` given at call time.

    It adopts the HF layer's submodules under their HF names (`self_attn`, `mlp`, `input_layernorm`,
    `post_attention_layernorm`; a linear-attention layer's `linear_attn` instead of `self_attn`, run by
    models/linear_attention.py), so weight names, checkpoints and exports are unchanged. All of a
    layer's work happens inside this module's forward, and its inputs and outputs are NamedTuples of
    tensors: that is what parameter sharding needs, since ZeRO-3 (with this class as a leaf module)
    and FSDP2 (with this module as a `fully_shard` unit) gather the layer's weights around its
    forward and backward, while the plan reads weight slices directly (head and FFN subsets).
    """

    def __init__(self, hf_layer: nn.Module):
        super().__init__()
        for name, child in hf_layer.named_children():
            self.add_module(name, child)
        self.attention = "auto"  # packed rows' causal kernel (models/packed_attention.py; MLLM.set_attention)
        self.kind = LINEAR if hasattr(hf_layer, "linear_attn") else FULL  # models/layer_kinds.py

    def decode(self, h: Tensor, cos: Tensor, sin: Tensor, keys: Keys | RecurrentState, masks, step: Tensor) -> Tensor:
        """One decoding step of this layer (models/decoding.py `decode_layer`; a linear-attention layer's
        `decode_linear_layer`, which continues its conv window and recurrent state in place). A method, so
        that FSDP2 gathers the layer's weights around it as around `forward` (train/infra/sharding.py)."""
        if self.kind == LINEAR:
            return decode_linear_layer(self, h, keys)
        return decode_layer(self, h, cos, sin, keys, masks, step)

    def forward(
        self, text: Stream, vis: Stream, query_idx: Tensor, policy: LayerPolicy, score_next: str | None = None,
        rope: RopeTable | None = None, visual_ffn_weight: Tensor | None = None, select_width: int | None = None,
    ) -> LayerIO:
        """`visual_ffn_weight` [B, V]: what each visual token's FFN output is multiplied by (a routed
        layer's router gate, models/routing.py); `select_width`: the visual tokens a selection inside the
        layer keeps at most in a row, as the host counted them (None: read back)."""
        if self.kind == LINEAR:  # no attention scores to give: a plan that asks for them was refused when set
            text, vis, state, router = run_linear_layer(self, policy, text, vis, visual_ffn_weight)
            return LayerIO(text, vis, state, None, router)
        return LayerRunner(self, policy, select_width)(text, vis, query_idx, score_next, rope, visual_ffn_weight)


class LayerRunner:
    """Runs one decoder layer's modules under a policy."""

    def __init__(self, layer: nn.Module, policy: LayerPolicy, select_width: int | None = None):
        self.layer = layer
        self.p = policy
        self.select_width = select_width
        self.attn = layer.self_attn
        self.dh = self.attn.head_dim
        self.n_heads = self.attn.o_proj.in_features // self.dh
        self.n_kv = self.attn.k_proj.out_features // self.dh
        self.q_norm = getattr(self.attn, "q_norm", None)  # Qwen3: per-head RMSNorm of q and k before RoPE
        self.k_norm = getattr(self.attn, "k_norm", None)
        self.backend = getattr(layer, "attention", "auto")

    def __call__(self, text: Stream, vis: Stream, query_idx: Tensor, score_next: str | None,
                 rope: RopeTable | None = None, visual_ffn_weight: Tensor | None = None) -> LayerIO:
        if self.p.select is not None and self.p.select.source == "current" and self.p.select.positions == "renumber":
            # PyramidDrop's stage boundary: score with this layer's own Q/K at the old positions, drop,
            # renumber the survivors, then run the layer on them as a layer without a selection
            if vis.n:
                vis = select_visual(vis, self._probe_scores(text, vis, query_idx), self.p.select, self.select_width)[0]
                text, vis = renumbered(text, vis, rope)
            self.p = replace(self.p, select=None)
        p, attn = self.p, self.attn
        if vis.n > 0 and runs_as_one_sequence(p):
            return self._one_sequence(text, vis, query_idx, score_next, visual_ffn_weight)
        heads = list(p.visual_heads) if p.visual_heads is not None else None
        x_text = self.layer.input_layernorm(text.h)
        k_text = self._keys(x_text, text, None, visual=False)

        # visual keys: needed by text queries (reading, or for the softmax denominator of the
        # released post-softmax semantics) or by updated visual tokens
        text_sees_visual = vis.n > 0 and (p.text_reads or p.mask_semantics == "post_softmax_zero")
        update = vis.n > 0 and p.updates_visual
        x_vis = self.layer.input_layernorm(vis.h) if update or (text_sees_visual and p.visual_kv_source == "current") else None
        k_vis = None
        if text_sees_visual or update:
            src = self.layer.input_layernorm(vis.embed) if p.visual_kv_source == "embed" else x_vis
            kv_heads = None if heads is None or p.mask_semantics == "post_softmax_zero" else sorted({h * self.n_kv // self.n_heads for h in heads})
            k_vis = self._keys(src, vis, kv_heads, visual=True)
            if p.select is not None and p.select.source == "current":
                vis, k_vis, x_vis = self._select_current(text, vis, k_text, k_vis, x_vis, x_text, query_idx)

        keys = k_text
        if text_sees_visual:
            keys = keys.append(k_vis)
        q_text, gate_text = project_queries(attn, x_text, None, self.dh, self.q_norm)
        q_text = apply_rope(q_text, text.cos, text.sin)
        if not text_sees_visual and score_next is None:
            # text-only: the text stream is ordered (valid tokens by position, then padding; Layout)
            out_text = causal_attention(q_text, keys.k, keys.v, attn.scaling, text.order, text.valid, text.start, self.backend)
            scores = None
        else:
            base = causal_mask(text.order, text.valid, keys, text.start)
            out_text, scores = self._text_attention(q_text, keys, base, text, vis, query_idx, score_next)
        h_text = text.h + attn.o_proj(merge_heads(gated(out_text, gate_text)))
        ffn, routed = feed_forward(self.layer.mlp, self.layer.post_attention_layernorm(h_text), text.valid)
        h_text = h_text + ffn
        router = () if routed is None else (routed,)

        if update:
            h_vis = vis.h + self._visual_attention(x_vis, vis, k_text, k_vis, heads)
            if p.visual_ffn > 0:
                ffn, routed = feed_forward(self.layer.mlp, self.layer.post_attention_layernorm(h_vis), vis.valid, p.visual_ffn)
                router += () if routed is None else (routed,)
                h_vis = h_vis + (ffn if visual_ffn_weight is None else ffn * visual_ffn_weight[..., None])
            vis = vis.with_h(h_vis)
        return LayerIO(text.with_h(h_text), vis, keys, scores, router)

    def _keys(self, x: Tensor, tokens: Stream, kv_heads: list[int] | None, visual: bool) -> Keys:
        """K/V of `tokens` (only `kv_heads`, zero elsewhere, when a head subset reads them)."""
        k = apply_rope(project_heads(self.attn.k_proj, x, kv_heads, self.dh, self.k_norm), tokens.cos, tokens.sin)
        v = project_heads(self.attn.v_proj, x, kv_heads, self.dh)
        if kv_heads is not None and len(kv_heads) < self.n_kv:
            full_k = k.new_zeros(k.shape[0], self.n_kv, *k.shape[2:])
            full_v = torch.zeros_like(full_k)
            full_k[:, kv_heads], full_v[:, kv_heads] = k, v
            k, v = full_k, full_v
        flag = torch.full_like(tokens.valid, visual)
        return Keys(k, v, tokens.order, tokens.valid, flag)

    def _one_sequence(self, text: Stream, vis: Stream, query_idx: Tensor, score_next: str | None,
                      visual_ffn_weight: Tensor | None = None) -> LayerIO:
        """Text and visual tokens as one sequence ordered by position (padding last), so a single
        causal SDPA call without a mask is exact; the cached keys stay in that order (every key
        carries its position, validity and kind)."""
        n_text = text.n
        order = sequence_order(torch.cat([text.order, vis.order], 1), torch.cat([text.valid, vis.valid], 1))
        b, n = order.shape
        row_start = torch.arange(b, device=order.device)[:, None] * n

        def take(x: Tensor, index: Tensor) -> Tensor:
            """Per row `x[i, index[i]]`, as one index_select (its backward keeps no copy of `x`, gather's does)."""
            return x.flatten(0, 1).index_select(0, (index + row_start).flatten()).view(b, n, *x.shape[2:])

        def seq(of_text: Tensor, of_vis: Tensor) -> Tensor:
            return take(torch.cat([of_text, of_vis], 1), order)

        h, cos, sin = seq(text.h, vis.h), seq(text.cos, vis.cos), seq(text.sin, vis.sin)
        start = None if text.start is None else seq(text.start, vis.start)
        x = self.layer.input_layernorm(h)
        q, gate = project_queries(self.attn, x, None, self.dh, self.q_norm)
        q = apply_rope(q, cos, sin)
        k = apply_rope(project_heads(self.attn.k_proj, x, None, self.dh, self.k_norm), cos, sin)
        v = project_heads(self.attn.v_proj, x, None, self.dh)
        keys = Keys(k, v, seq(text.order, vis.order), seq(text.valid, vis.valid), seq(torch.zeros_like(text.valid), torch.ones_like(vis.valid)))
        out = causal_attention(q, k, v, self.attn.scaling, keys.order, keys.valid, start, self.backend)
        h = h + self.attn.o_proj(merge_heads(gated(out, gate)))
        ffn, routed = feed_forward(self.layer.mlp, self.layer.post_attention_layernorm(h), keys.valid)
        if visual_ffn_weight is not None:
            ffn = ffn * seq(torch.ones_like(text.h[..., 0]), visual_ffn_weight)[..., None]
        h = h + ffn
        slot = order.argsort(1)  # where each stream token sits in the sequence
        h = take(h, slot)
        scores = None
        if score_next is not None:
            last = torch.gather(slot, 1, scoring_rows(query_idx))  # [B, Q] in the sequence
            last_start = None if start is None else torch.gather(start, 1, last)
            m_last = causal_mask(torch.gather(keys.order, 1, last), torch.gather(keys.valid, 1, last), keys, last_start)
            probs = last_query_probs(take_heads(q, last), keys, m_last.expand(-1, self.n_heads, -1, -1), self.attn.scaling)
            scores = visual_scores(probs, keys, slot[:, n_text:], score_next, query_of_visual(vis.start, last_start))
        return LayerIO(text.with_h(h[:, :n_text]), vis.with_h(h[:, n_text:]), keys, scores, () if routed is None else (routed,))

    def _text_attention(self, q: Tensor, keys: Keys, base: Tensor, text: Stream, vis: Stream, query_idx: Tensor, score_next: str | None):
        p = self.p
        heads = p.visual_heads
        if p.mask_semantics == "renorm" and p.text_reads_visual != "sink":
            hm = head_visual_mask(keys, heads, self.n_heads, reads=True) if heads is not None else None
            mask = base if hm is None else base & hm
            out = attend(q, keys, mask, self.attn.scaling)
        else:
            mask = base
            zero = None
            if p.mask_semantics == "post_softmax_zero":
                allowed = head_visual_mask(keys, heads, self.n_heads, reads=p.text_reads)
                zero = None if allowed is None else ~allowed
            out = attend_eager(q, keys, base, self.attn.scaling, zero=zero, sink=p.text_reads_visual == "sink", q_start=text.start)
        scores = None
        if score_next is not None:
            rows = scoring_rows(query_idx)
            m_last = take_heads(mask.expand(-1, self.n_heads, -1, -1), rows)
            probs = last_query_probs(take_heads(q, rows), keys, m_last, self.attn.scaling)
            q_start = None if text.start is None else torch.gather(text.start, 1, rows)
            scores = visual_scores(probs, keys, last_columns(keys, vis.n), score_next, query_of_visual(vis.start, q_start))
        return out, scores

    def _scoring_query(self, x_text: Tensor, text: Stream, query_idx: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor | None]]:
        """This layer's queries [B, H, Q, dh] of the scoring tokens (normed hidden states `x_text`), and
        their order, validity and sample start [B, Q] (start None in unpacked rows)."""
        rows = scoring_rows(query_idx)
        q = project_queries(self.attn, take_tokens(x_text, rows), None, self.dh, self.q_norm)[0]
        q = apply_rope(q, take_tokens(text.cos, rows), take_tokens(text.sin, rows))
        start = None if text.start is None else torch.gather(text.start, 1, rows)
        return q, (torch.gather(text.order, 1, rows), torch.gather(text.valid, 1, rows), start)

    def _query_scores(self, q_last: Tensor, facts, keys: Keys, vis: Stream, scorer: str) -> Tensor:
        """Scores [B, V] of the visual keys (the last `vis.n` of `keys`) by the scoring queries."""
        order, valid, start = facts
        m_last = causal_mask(order, valid, keys, start).expand(-1, self.n_heads, -1, -1)
        probs = last_query_probs(q_last, keys, m_last, self.attn.scaling)
        return visual_scores(probs, keys, last_columns(keys, vis.n), scorer, query_of_visual(vis.start, start))

    def _probe_scores(self, text: Stream, vis: Stream, query_idx: Tensor) -> Tensor:
        """Scores [B, V] of the visual tokens by the last prompt token's attention under this layer's
        own norm, Q and K (K of every token present, one query per row): PyramidDrop's ranking."""
        src = vis.embed if self.p.visual_kv_source == "embed" else vis.h
        x_text = self.layer.input_layernorm(text.h)
        k_text = apply_rope(project_heads(self.attn.k_proj, x_text, None, self.dh, self.k_norm), text.cos, text.sin)
        k_vis = apply_rope(project_heads(self.attn.k_proj, self.layer.input_layernorm(src), None, self.dh, self.k_norm),
                           vis.cos, vis.sin)
        q_last, facts = self._scoring_query(x_text, text, query_idx)
        k = torch.cat([k_text, k_vis], 2)
        keys = Keys(k, k, torch.cat([text.order, vis.order], 1), torch.cat([text.valid, vis.valid], 1),
                    torch.cat([torch.zeros_like(text.valid), torch.ones_like(vis.valid)], 1))
        return self._query_scores(q_last, facts, keys, vis, "attn_last")

    def _select_current(self, text, vis, k_text, k_vis, x_vis, x_text, query_idx):
        """PDrop-style: score visual tokens with this layer's own Q/K of the last prompt token, then
        continue the layer with the kept tokens only (their values, queries and FFN)."""
        q_last, facts = self._scoring_query(x_text, text, query_idx)
        scores = self._query_scores(q_last, facts, k_text.append(k_vis), vis, self.p.select.scorer)
        kept, index = select_visual(vis, scores, self.p.select, self.select_width)
        k_vis = Keys(
            torch.gather(k_vis.k, 2, index[:, None, :, None].expand(-1, k_vis.k.shape[1], -1, k_vis.k.shape[3])),
            torch.gather(k_vis.v, 2, index[:, None, :, None].expand(-1, k_vis.v.shape[1], -1, k_vis.v.shape[3])),
            kept.order,
            kept.valid,
            torch.gather(k_vis.is_visual, 1, index),
        )
        if x_vis is not None:
            x_vis = torch.gather(x_vis, 1, index[:, :, None].expand(-1, -1, x_vis.shape[-1]))
        return kept, k_vis, x_vis

    def _visual_attention(self, x_vis: Tensor, vis: Stream, k_text: Keys, k_vis: Keys, heads: list[int] | None) -> Tensor:
        """Attention output (after o_proj) of the visual tokens: their kept heads only."""
        p = self.p
        q, gate = project_queries(self.attn, x_vis, heads, self.dh, self.q_norm)
        q = apply_rope(q, vis.cos, vis.sin)
        hs = heads if heads is not None else list(range(self.n_heads))
        kv_of = head_numbers(hs, q.device) * self.n_kv // self.n_heads  # each query head's K/V head
        tk = Keys(k_text.k[:, kv_of], k_text.v[:, kv_of], k_text.order, k_text.valid, k_text.is_visual)
        if p.visual_self_attn == "full":
            keys = tk.append(Keys(k_vis.k[:, kv_of], k_vis.v[:, kv_of], k_vis.order, k_vis.valid, k_vis.is_visual))
            out = attend(q, keys, causal_mask(vis.order, vis.valid, keys, vis.start), self.attn.scaling)
        else:
            nb = grid_neighbours(vis.place, vis.valid, p.window) if p.visual_self_attn == "local" else None
            out = attend_visual(q, tk, vis.order, k_vis.k[:, kv_of], k_vis.v[:, kv_of], p.visual_self_attn, self.attn.scaling, nb,
                                q_start=vis.start)
        return output_heads(self.attn.o_proj, gated(out, gate), heads, self.dh)


# --- the layer stack ---------------------------------------------------------------------------


class LayerStep(NamedTuple):
    """What a layer hook sees after each decoder layer: the layer and its policy, its input streams
    and the outputs it produced, and each row's scoring token (the last prompt token)."""

    index: int
    layer: PlannedDecoderLayer
    policy: LayerPolicy
    text_in: Stream
    vis_in: Stream
    text_out: Stream
    vis_out: Stream
    query_idx: Tensor  # [B]


LayerHook = Callable[[LayerStep], "tuple[Stream, Stream] | None"]  # returns replacement (text, vis) or None


def run_decoder(
    lm: nn.Module,
    plan: Plan,
    text: Stream,
    vis: Stream,
    query_idx: Tensor,
    xattn: nn.ModuleDict | None = None,
    use_cache: bool = False,
    gradient_checkpointing: bool = False,
    hook: LayerHook | None = None,
    image_keys: Tensor | None = None,
    rope: RopeTable | None = None,
    routing: Routing | None = None,
    counts: VisualCounts | None = None,
) -> "DecoderOutput":
    """Run every layer of `lm` (an HF `LlamaModel`/`Qwen2Model`) under `plan` (prefill and training;
    decoding over the keys it caches with `use_cache`: models/decoding.py). `query_idx` [B] indexes the text token that scores visual tokens
    for selections (the last prompt token); `image_keys` [B, I] seed random selections
    (`models.blind_scores.image_keys_for`). `hook` is called after every layer with a `LayerStep`
    and may replace the layer's output streams (the analysis tools measure layers this way).
    Plans whose selections renumber positions need `rope` (the RoPE tables of positions 0..P-1); the
    output's `rope_shift` says how far each layer's positions moved (decoding continues from there).
    Plans that route visual tokens (`LayerPolicy.route`) need `routing` (models/routing.py): it
    picks each routed layer's tokens before the layer's (possibly checkpointed) call and puts the
    skipped ones back after it; decoding runs no router (text is never routed).
    `counts`: the visual tokens as the host follows them through the plan (models/host_sizes.py), which
    size every selection's kept stream without reading the device; None: each size is read back.
    After layer i the visual stream receives its family's injection i, if it carries one
    (`models.streams.injected`: Qwen3-VL's DeepStack), after the hook; routed-out tokens are in the
    stream again by then and receive it too.
    Returns a `DecoderOutput`.
    """
    layer_keys: list[Keys] = []
    cross_keys: dict[int, Keys] = {}
    embeds = vis  # gated blocks read the projector output of every (pre-LLM-kept) visual token
    scores = None
    renumbers = plan.renumbers
    prompt_tokens = present_count(text, vis)
    shift = torch.zeros_like(text.valid[:, 0], dtype=torch.long)
    shifts = []
    router: list[RouterLogits] = []
    for i, layer in enumerate(lm.layers):
        p = plan.layers[i]
        after = None if counts is None or p.select is None else counts.selected(p.select)  # the host's count after a selection
        if p.drop_visual:
            vis = empty_like_visual(text)
            counts = None if counts is None else counts.dropped()
        elif p.select is not None and p.select.source == "previous":
            vis = select_before_layer(vis, p.select, scores, image_keys, None if after is None else after.width)
            counts = after
            if p.select.positions == "renumber":
                text, vis = renumbered(text, vis, rope)
        if p.xattn:
            block = xattn[str(i)]
            if i not in cross_keys:
                cross_keys[i] = block.visual_keys(embeds.embed, embeds.order, embeds.valid)
            text = text.with_h(block(text.h, text.order, cross_keys[i], text.start))
        nxt = plan.layers[i + 1] if i + 1 < len(plan.layers) else None
        score_next = nxt.select.scorer if nxt is not None and nxt.select is not None and nxt.select.scores_previous_layer else None
        routed = None
        if p.route is not None:
            if routing is None:
                raise ValueError(f"plan {plan.name!r} routes layer {i}: pass routing=models.routing.Routing(...) to run_decoder")
            routed = routing.enter(i, vis, None if counts is None else counts.routed(p.route))
        inside = p.select is not None and p.select.source == "current"  # a selection the layer makes itself (PDrop)
        args = (text, vis if routed is None else routed.kept, query_idx, p, score_next, rope, None if routed is None else routed.weight,
                None if not inside or after is None else after.width)
        if gradient_checkpointing and torch.is_grad_enabled():
            io = checkpoint(layer, *args, use_reentrant=False)
        else:
            io = layer(*args)
        vis_out = io.vis if routed is None else routing.leave(vis, routed, io.vis)
        replaced = hook(LayerStep(i, layer, p, text, vis, io.text, vis_out, query_idx)) if hook is not None else None
        text, vis = replaced if replaced is not None else (io.text, vis_out)
        vis = injected(vis, i)
        scores = io.scores
        router.extend(io.router)
        if inside:
            counts = after
        if renumbers:
            if p.select is not None and p.select.positions == "renumber":
                shift = prompt_tokens - present_count(io.text, io.vis)
            shifts.append(shift)
        if use_cache:
            layer_keys.append(io.keys)
    rope_shift = torch.stack(shifts) if shifts else None
    return DecoderOutput(text, vis, layer_keys, cross_keys if use_cache else {}, rope_shift, router)


class DecoderOutput(NamedTuple):
    """What `run_decoder` gives back."""

    text: Stream
    vis: Stream
    keys: list[Keys | RecurrentState]  # per layer (the KV cache, a linear-attention layer's state; kept with use_cache)
    cross: dict[int, Keys]  # gated cross-attention keys by layer (same)
    rope_shift: Tensor | None  # [layers, B] prompt tokens a renumbering removed before each layer (None: none)
    router: list[RouterLogits]  # every MoE FFN call's router logits, in layer order (the load-balancing loss)
