"""Decoding with fixed shapes: a KV cache with room for the generated tokens, and a lean step over it.

Decode at small batch is launch-bound, and a step whose shapes change every token can neither be
compiled once nor captured as a CUDA graph. So after prefill `reserve` gives every layer's cache room
for the tokens to come: generated tokens take the first columns (column j holds the j-th generated
token in every layer, so one index serves all layers), the prompt's surviving keys follow (each layer
keeps only what its plan cached). The per-key facts (order, validity, kind) of every column are set
once: a generated token's order is known in advance, and causality (`order <= query order`) hides the
columns not written yet, so a step only writes K and V. What each layer's heads may read of the prompt
(validity, a head mask, post-softmax zeroing) is fixed too, and computed here once per generation.

`decode_step` is then one embedding, one RoPE table, per layer RMSNorm -> Q/K/V -> RoPE -> two cache
writes -> attention -> o_proj -> FFN, and the LM head, with no host sync and no data-dependent shape:
`torch.compile(fullgraph=True)` takes it whole, and on CUDA `mode="reduce-overhead"` replays it as a
CUDA graph (`compiled_step`). Plans change only which columns a layer caches and reads; ViCA's gated
blocks, renumbered RoPE positions (PyramidDrop) and the released attention semantics (post-softmax
zeroing, VisiPruner's sink) are honoured exactly as in prefill (tests/test_decoding.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .attention import Keys, attend_eager, gated, has_output_gate, head_visual_mask, merge_heads, rotate, sdpa, split_heads
from .linear_attention import RecurrentState
from .moe import feed_forward


class LayerMasks(NamedTuple):
    """What one layer's generated tokens may read of its cache."""

    bias: Tensor  # [B, 1|H, 1, S] additive (SDPA's float mask): -inf on the prompt columns a head may not read
                  # and on the generated columns not written yet; each step opens its own column, in place
    zero: Tensor | None  # [B, H, 1, S] bool: columns zeroed after the softmax (mask_semantics=post_softmax_zero)


@dataclass
class Room:
    """Room for generated tokens in a `DecodeState` (see the module docstring)."""

    size: int  # generated tokens every layer's cache holds
    used: int  # of which written (counted on the host, outside the compiled step, which never reads it)
    step: Tensor  # [1] long: the column of the next generated token, the same in every layer
    first_order: Tensor  # [B] the order of each row's first generated token
    first_rope: Tensor  # [B] its RoPE position
    masks: list[LayerMasks | None]  # None for a linear-attention layer (no keys to mask)
    rope: dict[int, tuple[Tensor, Tensor]]  # cos / sin [B, 1, size, dh] of every generated token: for layer 0
                                            # and for each layer whose positions a renumbering selection shifted


@dataclass
class DecodeState:
    """What decoding needs after prefill: per-layer keys (the KV cache), cross-attention keys of
    gated blocks, and each row's next order and RoPE position (counted here, never read back from
    cache lengths: a pruned layer's cache is shorter than its neighbours'); `reserve` adds the room."""

    keys: list[Keys | RecurrentState]  # a linear-attention layer keeps its conv window and recurrent state instead
    next_order: Tensor  # [B] sequence order of the next token (each row's own counter)
    next_rope: Tensor  # [B] its RoPE position (the order, or the order plus the family's rope delta)
    xattn: dict[int, Keys] = field(default_factory=dict)
    rope_shift: Tensor | None = None  # [layers, B] prompt tokens a renumbering selection removed before each layer
    room: Room | None = None  # room for generated tokens in every layer's keys (`reserve`)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes for k in self.keys) + sum(k.nbytes for k in self.xattn.values())

    @property
    def visual_nbytes(self) -> int:
        """Bytes of cached visual K/V (what plans save at decode time)."""
        return sum(k.visual_nbytes for k in [*self.keys, *self.xattn.values()])


def _insert(x: Tensor, dim: int, at: int, n: int, fill) -> Tensor:
    """`x` with `n` columns of `fill` inserted before index `at` of `dim`."""
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.narrow(dim, 0, at), x.new_full(shape, fill), x.narrow(dim, at, x.shape[dim] - at)], dim)


def _layer_masks(keys: Keys, size: int, used: int, policy, n_heads: int) -> LayerMasks:
    """A layer's masks over its cache: the prompt's valid columns (only the heads a head mask lets read
    visual keys, under renorm semantics), the generated columns written so far (`used`)."""
    readable = keys.valid.clone()
    readable[:, used:size] = False
    readable = readable[:, None, None, :]
    zero = None
    if policy.mask_semantics == "renorm" and policy.text_reads_visual != "sink":
        if policy.visual_heads is not None:
            readable = readable & head_visual_mask(keys, policy.visual_heads, n_heads, reads=True)
    elif policy.mask_semantics == "post_softmax_zero":
        allowed = head_visual_mask(keys, policy.visual_heads, n_heads, reads=policy.text_reads)
        zero = None if allowed is None else ~allowed
    bias = torch.zeros(readable.shape, dtype=keys.k.dtype, device=readable.device).masked_fill(~readable, float("-inf"))
    return LayerMasks(bias, zero)


def merged_values(keys: Keys) -> Tensor:
    """VisiPruner's attention merging as values: a sink layer moves every text -> visual probability onto
    the row's first visual key, which is the same as reading every visual key's value as the first one's
    (models/attention.py `attend_eager`). Written into the cache once, it lets decoding use SDPA."""
    n = keys.n
    visual = keys.is_visual & keys.valid
    first = torch.where(visual, torch.arange(n, device=visual.device), n).amin(-1).clamp(max=max(n - 1, 0))
    v_first = torch.gather(keys.v, 2, first[:, None, None, None].expand(-1, keys.v.shape[1], 1, keys.v.shape[3]))
    return torch.where(visual[:, None, :, None], v_first, keys.v)


def renumbered_layers(plan) -> tuple[int, ...]:
    """Layers before which the RoPE positions of a renumbering plan change (PyramidDrop's stages)."""
    return tuple(i for i, p in enumerate(plan.layers) if p.select is not None and p.select.positions == "renumber")


def reserve(model, state, tokens: int, bucket: int = 1) -> None:
    """Make room in `state` (a prefill's `DecodeState`) for `tokens` more generated tokens: every layer's
    K/V get that many columns (at least, rounded up to a multiple of `bucket`, so that compiled steps of
    similar lengths share a graph), written by `decode_step`. Shapes are fixed until the room is used up."""
    room = state.room
    old, used = (0, 0) if room is None else (room.size, room.used)
    size = bucket * math.ceil((used + tokens) / bucket)
    if size <= old:
        return
    first_order = state.next_order.clone() if room is None else room.first_order
    first_rope = state.next_rope.clone() if room is None else room.first_rope
    extra, device = size - old, first_order.device
    n_heads = model.text_config.num_attention_heads
    keys, masks, written = [], [], []
    for k, policy in zip(state.keys, model.plan.layers):
        if isinstance(k, RecurrentState):  # a fixed-size state: no room to make, continued in place
            keys.append(k)
            masks.append(None)
            written.extend(k)
            continue
        order = first_order[:, None] + torch.arange(old, size, device=device)
        if policy.text_reads_visual == "sink" and room is None:
            k = k._replace(v=merged_values(k))
        k = Keys(_insert(k.k, 2, old, extra, 0.0), _insert(k.v, 2, old, extra, 0.0),
                 torch.cat([k.order[:, :old], order, k.order[:, old:]], 1), _insert(k.valid, 1, old, extra, True),
                 _insert(k.is_visual, 1, old, extra, False))
        keys.append(k)
        masks.append(_layer_masks(k, size, used, policy, n_heads))
        written.extend((k.k, k.v))
    positions = first_rope[:, None] + torch.arange(size, device=device)
    like = torch.empty(0, dtype=model.dtype, device=device)
    shifts = {0: None, **{i: state.rope_shift[i] for i in renumbered_layers(model.plan)}} if state.rope_shift is not None else {0: None}
    rope = {i: tuple(t[:, None] for t in model.rope(like, positions if shift is None else positions - shift[:, None]))
            for i, shift in shifts.items()}
    step = torch.full((1,), used, dtype=torch.long, device=device) if room is None else room.step
    for t in (step, state.next_order, state.next_rope, *(m.bias for m in masks if m is not None), *written):
        torch._dynamo.mark_static_address(t)  # written in place by every step, also inside a CUDA graph
    state.keys = keys
    state.room = Room(size, used, step, first_order, first_rope, masks, rope)


def decode_step(model, token_ids: Tensor, state, core: Callable = None) -> Tensor:
    """One decoding step (token_ids [B] -> next-token logits [B, vocab]) by `core` (`decode_tokens`, or its
    compiled form), after making room when the reserved room is used up; `state` is updated in place."""
    room = state.room
    if room is None or room.used == room.size:
        reserve(model, state, max(32, 0 if room is None else room.size))
    logits = (core or decode_tokens)(model, token_ids, state)
    state.room.used += 1
    return logits


def decode_tokens(model, token_ids: Tensor, state) -> Tensor:
    """The step itself, over a reserved `state` (fixed shapes, no host sync): what `compiled_step` compiles."""
    lm, plan, room = model.language_model, model.plan, state.room
    h = lm.embed_tokens(token_ids[:, None])
    order = state.next_order[:, None]
    for i, layer in enumerate(lm.layers):
        p = plan.layers[i]
        if i in room.rope:
            cos, sin = (t.index_select(2, room.step) for t in room.rope[i])
        if p.xattn:
            h = model.xattn[str(i)](h, order, state.xattn[i])
        h = layer.decode(h, cos, sin, state.keys[i], room.masks[i], room.step)
    room.step.add_(1)
    state.next_order.add_(1)
    state.next_rope.add_(1)
    return model.lm_logits(h[:, 0])


def decode_layer(layer, h: Tensor, cos: Tensor, sin: Tensor, keys: Keys, masks: LayerMasks, step: Tensor) -> Tensor:
    """One decoder layer on the new token `h` [B, 1, d] (RoPE tables cos / sin [B, 1, 1, r], r < dh under
    partial rotary): its K/V written at column `step`, which its mask then opens, its query reading what the
    mask allows (times its sigmoid output gate under gated attention, Qwen3.5)."""
    attn = layer.self_attn
    dh = attn.head_dim
    x = layer.input_layernorm(h)
    gate = None
    if has_output_gate(attn):  # each head's query and its gate side by side in q_proj's output
        q, gate = split_heads(attn.q_proj(x), 2 * dh).split(dh, dim=-1)
    else:
        q = split_heads(attn.q_proj(x), dh)
    k = split_heads(attn.k_proj(x), dh)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3: per-head norms before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = rotate(q, cos, sin)
    keys.k.index_copy_(2, step, rotate(k, cos, sin))
    keys.v.index_copy_(2, step, split_heads(attn.v_proj(x), dh))
    masks.bias.index_fill_(3, step, 0.0)
    if masks.zero is None:  # (a sink layer's merging is in its cached values: `merged_values`)
        out = sdpa(q, keys.k, keys.v, attn.scaling, mask=masks.bias)
    else:  # post-softmax zeroing needs the probabilities (models/attention.py)
        out = attend_eager(q, keys, masks.bias.isfinite(), attn.scaling, zero=masks.zero)
    h = h + attn.o_proj(merge_heads(gated(out, gate)))
    return h + feed_forward(layer.mlp, layer.post_attention_layernorm(h), keys.valid)[0]  # (router logits: training only)


def compiled_step(model, **options) -> Callable[[Tensor, object], Tensor]:
    """`decode_step` with `decode_tokens` under `torch.compile(fullgraph=True, **options)`; on CUDA captured
    as a CUDA graph (`mode="reduce-overhead"`) and replayed every step. Compiled once per model, plan and
    cache shape (`reserve`'s `bucket` keeps the shapes few)."""
    cuda = model.lm_head.weight.device.type == "cuda"
    if cuda:
        options.setdefault("mode", "reduce-overhead")
    core = torch.compile(decode_tokens, fullgraph=True, **options)

    def step(token_ids: Tensor, state) -> Tensor:
        if cuda:  # the previous step's outputs may be overwritten now (they were read: argmax)
            torch.compiler.cudagraph_mark_step_begin()
        return decode_step(model, token_ids, state, core)

    return step
