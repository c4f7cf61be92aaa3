"""Attention over explicit query and key sets, with masks derived from original positions.

A layer attends from a set of query tokens to a set of key tokens that need not be the same
tokens (text-only queries over text+visual keys, cached keys at decode time, ...). Causality is
`key_order <= query_order` (sequence order, models/streams.py), so the order in which tokens are
stored never matters.

Two query groups exist: text queries (every layer, prefill and decode) and visual queries (only
where visual tokens are updated). Text queries use SDPA unless a layer asks for the released
post-softmax semantics or a sink, which need the full probability matrix (eager).

Packed rows (several samples per row) add "not before the query's own sample" to every mask; their
mask-free causal calls go through models/packed_attention.py instead.

Every SDPA call goes through `sdpa`, which keeps GPUs on their fast kernels: where queries and keys
are the same tokens ordered by position with padding last (`sequence_order`), causality is
`is_causal=True` and no mask exists; grouped-query K/V are read natively (`enable_gqa`) unless a
mask forces the expansion. `record_sdpa_calls` lets tests see which path each call took.
"""

from __future__ import annotations

import operator
from contextlib import contextmanager
from functools import reduce
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, N, dh]; cos/sin: [B, N, r] (HF Llama/Qwen2 rotate-half convention)."""
    return rotate(x, cos.unsqueeze(1), sin.unsqueeze(1))


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE of x [..., dh] by tables that broadcast against it ([..., r]). A table narrower than the head
    (r < dh: partial rotary, Qwen3.5's quarter) rotates the first r dims, the rest pass."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        rot = x[..., :r]
        return torch.cat([rot * cos + rotate_half(rot) * sin, x[..., r:]], dim=-1)
    return x * cos + rotate_half(x) * sin


def has_output_gate(attn) -> bool:
    """Gated attention (Qwen3.5's full-attention layers, transformers' `Qwen3_5Attention`): `q_proj` writes
    each head's query and a gate beside it, and the head's output is multiplied by sigmoid(gate)."""
    return attn.q_proj.out_features == 2 * attn.o_proj.in_features


def gated(out: Tensor, gate: Tensor | None) -> Tensor:
    """Attention output [B, H, N, dh] times its sigmoid output gate (gated attention), or as it is."""
    return out if gate is None else out * torch.sigmoid(gate)


def split_heads(x: Tensor, head_dim: int) -> Tensor:
    b, n, d = x.shape
    return x.view(b, n, d // head_dim, head_dim).transpose(1, 2)  # (not -1: a stream may hold no token)


def merge_heads(x: Tensor) -> Tensor:
    b, h, n, dh = x.shape
    return x.transpose(1, 2).reshape(b, n, h * dh)


class Keys(NamedTuple):
    """Keys and values of one layer plus the per-key facts masks need; this is also the KV cache."""

    k: Tensor  # [B, Hkv, S, dh] (RoPE applied)
    v: Tensor  # [B, Hkv, S, dh]
    order: Tensor  # [B, S] sequence order
    valid: Tensor  # [B, S]
    is_visual: Tensor  # [B, S]

    def append(self, other: "Keys") -> "Keys":
        return Keys(*(torch.cat([a, b], dim=2 if a.dim() == 4 else 1) for a, b in zip(self, other)))

    @property
    def n(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    @property
    def visual_nbytes(self) -> int:
        """Bytes of the visual tokens' keys and values."""
        frac = self.is_visual.float().mean().item() if self.is_visual.numel() else 0.0
        return int(self.nbytes * frac)


def causal_mask(q_order: Tensor, q_valid: Tensor, keys: Keys, q_start: Tensor | None = None) -> Tensor:
    """[B, 1, Q, S] boolean mask: valid keys at or before each query in sequence order (and, in
    packed rows, not before the first token of the query's sample, `q_start`: models/packed_attention.py).

    Padding queries may attend to everything: their outputs are never read, and a fully masked row
    would produce NaNs that leak through 0 * NaN into real tokens.
    """
    allowed = keys.valid[:, None, :] & (keys.order[:, None, :] <= q_order[:, :, None])
    if q_start is not None:
        allowed = allowed & (keys.order[:, None, :] >= q_start[:, :, None])
    allowed = allowed | ~q_valid[:, :, None]
    return allowed[:, None]


def expand_kv(x: Tensor, n_heads: int) -> Tensor:
    n_rep = n_heads // x.shape[1]
    return x.repeat_interleave(n_rep, dim=1) if n_rep > 1 else x


def head_visual_mask(keys: Keys, heads: tuple[int, ...] | None, n_heads: int, reads: bool) -> Tensor | None:
    """[B, H, 1, S] mask of the columns each head may read: text keys always, visual keys only in
    `heads` (all heads when None) and only if text `reads` visual tokens. None: no restriction."""
    if reads and heads is None:
        return None
    allowed_heads = torch.zeros(n_heads, dtype=torch.bool, device=keys.k.device)
    if reads:
        allowed_heads = is_one_of(torch.arange(n_heads, device=keys.k.device), heads)
    return ~keys.is_visual[:, None, None, :] | allowed_heads[None, :, None, None]


def is_one_of(x: Tensor, values) -> Tensor:
    """x in `values` (Python ints), by comparisons: a range as two, no index tensor copied to the device."""
    values = sorted(values)
    if values == list(range(values[0], values[-1] + 1)):
        return (x >= values[0]) & (x <= values[-1])
    return reduce(operator.or_, [x == v for v in values])


class SdpaCall(NamedTuple):
    """What the kernels see of one `sdpa` call. `mask`: "causal" (is_causal, nothing materialised),
    "none", or "mask" (a boolean mask of shape `mask_shape`). `gqa`: "native" (enable_gqa),
    "packed" (one query row per head folded onto its K/V head), "expanded" (K/V repeated in
    memory) or "mha" (as many K/V heads as query heads)."""

    mask: str
    gqa: str
    mask_shape: tuple[int, ...] | None
    q_len: int
    k_len: int


_recorders: list[list[SdpaCall]] = []


@contextmanager
def record_sdpa_calls() -> Iterator[list[SdpaCall]]:
    """Collect every `sdpa` call made inside the block, in order (tests assert on the paths)."""
    calls: list[SdpaCall] = []
    _recorders.append(calls)
    try:
        yield calls
    finally:
        _recorders.remove(calls)


def sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """q [B, H, Q, dh], k/v [B, Hkv, S, dh] -> [B, H, Q, dh].

    `causal`: query i sees keys 0..i (the same tokens, ordered; see `sequence_order`), passed as
    is_causal so flash kernels run. Grouped-query K/V go to SDPA as they are (`enable_gqa`) when
    there is no mask; with a mask CUDA would fall back to the math kernel for GQA (transformers'
    `use_gqa_in_sdpa`), so a single query row is folded onto its K/V head (transformers' `pack_gqa`; a
    per-head mask folds with the heads) and other masked calls expand K/V.
    """
    b, h, n_q, dh = q.shape
    n_kv, n_k = k.shape[1], k.shape[2]
    if causal and (mask is not None or n_q != n_k):
        raise ValueError("causal attention takes no mask and needs the queries to be the keys (same tokens, same order)")
    rep = h // n_kv
    if rep == 1:
        gqa = "mha"
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    elif mask is None:
        gqa = "native"
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
    elif n_q == 1:  # a per-head mask [B, H, 1, S] folds with its heads (head kv * rep + r reads K/V head kv)
        gqa = "packed"
        folded = mask if mask.shape[1] == 1 else mask.reshape(mask.shape[0], n_kv, rep, mask.shape[-1])
        out = F.scaled_dot_product_attention(q.reshape(b, n_kv, rep, dh), k, v, attn_mask=folded, scale=scale).reshape(b, h, 1, dh)
    else:
        gqa = "expanded"
        out = F.scaled_dot_product_attention(q, expand_kv(k, h), expand_kv(v, h), attn_mask=mask, scale=scale)
    if _recorders:
        kind = "causal" if causal else ("none" if mask is None else "mask")
        _recorders[-1].append(SdpaCall(kind, gqa, None if mask is None else tuple(mask.shape), n_q, n_k))
    return out


def attend(q: Tensor, keys: Keys, mask: Tensor, scale: float) -> Tensor:
    """Masked scaled dot-product attention over `keys` (grouped-query K/V); returns [B, H, Q, dh]."""
    return sdpa(q, keys.k, keys.v, scale, mask=mask)


def sequence_order(order: Tensor, valid: Tensor) -> Tensor:
    """[B, N] indices that sort each row's tokens into one causal sequence: valid tokens by
    order, padding last. Orders of valid tokens are distinct, so on the sorted tokens
    "key order <= query order" is "key index <= query index" for every valid query: exactly
    is_causal (padding queries see other tokens, as `causal_mask` allows; their outputs are never read)."""
    key = torch.where(valid, order, order.new_tensor(torch.iinfo(order.dtype).max))
    return torch.sort(key, dim=1, stable=True).indices


def attend_eager(q: Tensor, keys: Keys, base: Tensor, scale: float, *, zero: Tensor | None = None, sink: bool = False,
                 q_start: Tensor | None = None) -> Tensor:
    """Attention with the released semantics that SDPA cannot express.

    `zero` [B, H|1, 1|Q, S]: columns allowed by `base` but zeroed *after* the softmax (no
    renormalisation: YOPO, VisiPruner shallow layers). `sink`: every text->visual probability is
    moved onto the first visual key of the row (VisiPruner's attention merging), preserving mass;
    in packed rows (`q_start` [B, Q]) onto the first visual key of the query's own sample.
    """
    h = q.shape[1]
    k, v = expand_kv(keys.k, h), expand_kv(keys.v, h)
    logits = (q @ k.transpose(-1, -2)) * scale
    probs = torch.softmax(logits.masked_fill(~base, float("-inf")), dim=-1)
    if zero is not None:
        probs = probs.masked_fill(zero, 0.0)
    if sink:
        vis = keys.is_visual[:, None, None, :]
        mass = (probs * vis).sum(-1, keepdim=True)
        column = torch.arange(keys.n, device=q.device)
        candidate = (keys.is_visual & keys.valid)[:, None, :]  # [B, 1 | Q, S]
        if q_start is not None:
            candidate = candidate & (keys.order[:, None, :] >= q_start[:, :, None])
        first = torch.where(candidate, column, keys.n).min(-1).values
        has = first < keys.n
        onehot = (column == first.clamp(max=keys.n - 1)[..., None]).to(probs.dtype) * has[..., None]  # (F.one_hot reads its range back)
        probs = probs.masked_fill(vis, 0.0) + mass * onehot[:, None, :, :]
    return probs @ v


def last_query_probs(q_last: Tensor, keys: Keys, base_last: Tensor, scale: float) -> Tensor:
    """Attention probabilities [B, H, Q, S] of the tokens that score visual tokens: one query per
    row, or per sample of a packed row (q_last [B, H, Q, dh], base_last [B, H, Q, S])."""
    h = q_last.shape[1]
    logits = (q_last @ expand_kv(keys.k, h).transpose(-1, -2)) * scale
    return torch.softmax(logits.masked_fill(~base_last, float("-inf")), dim=-1)


def grid_neighbours(place: Tensor, valid: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """For each visual token, the stream indices of its `window` x `window` neighbours on its own
    unit's grid (same image and unit, rows and columns within window // 2) and which exist.

    `place` [B, V, len(Place)], `valid` [B, V]. Returns `index` [B, V, w*w] (into the stream) and
    `ok` [B, V, w*w]; offsets run row-major from (-w//2, -w//2), so the centre is the token itself
    (always ok: no query row is ever empty, padding included). Tokens are found by a sorted key
    lookup, so any layout works: a square LLaVA-1.5 grid, LLaVA-NeXT's tiles (partial after
    unpadding), grids of different sizes per image."""
    from .streams import Place

    from .selection import row_groups

    b, v, _ = place.shape
    image, unit, row, col = (place[..., c] for c in (Place.IMAGE, Place.UNIT, Place.ROW, Place.COL))
    on_grid = valid & (row >= 0)
    half = window // 2
    # keys pack (row of the batch, grid of the row, grid row, grid column) into 64 bits with fixed spans
    # (no bound read back): grids below 2**16 - window on a side, fewer than 2**31 tokens in the batch
    grid = torch.arange(b, device=place.device)[:, None] * v + row_groups(image, unit)
    span = 2**16

    def key(r: Tensor, c: Tensor) -> Tensor:  # rows and columns shifted by `half` so neighbours never wrap
        return (grid.view(*grid.shape, *([1] * (r.dim() - 2))) * span + (r + half)) * span + (c + half)

    own = torch.where(on_grid, key(row, col), torch.iinfo(torch.long).max)
    sorted_keys, by_key = own.flatten().sort()
    off = torch.arange(window, device=place.device) - half
    dr, dc = (t.reshape(-1) for t in torch.meshgrid(off, off, indexing="ij"))
    wanted = key(row[..., None] + dr, col[..., None] + dc)  # [B, V, w*w]
    at = torch.searchsorted(sorted_keys, wanted.flatten()).clamp(max=sorted_keys.numel() - 1).view_as(wanted)
    found = (sorted_keys[at] == wanted) & on_grid[..., None]
    flat = by_key[at]  # index into the flattened [B * V] stream
    index = torch.where(found, flat % max(v, 1), torch.arange(v, device=place.device)[None, :, None])
    found[..., (window * window) // 2] = True
    index[..., (window * window) // 2] = torch.arange(v, device=place.device)[None, :]
    return index, found


def attend_visual(
    q: Tensor,
    text_keys: Keys,
    q_order: Tensor,
    vis_k: Tensor,
    vis_v: Tensor,
    mode: str,
    scale: float,
    neighbours: tuple[Tensor, Tensor] | None = None,
    q_start: Tensor | None = None,
) -> Tensor:
    """Visual queries that do not attend to all visual tokens: the text keys before them plus
    either their local window (`neighbours` from `grid_neighbours`, gathered so the cost is
    linear in the number of visual tokens; a window never leaves its image, hence its sample) or only
    themselves (`none`). q/vis_k/vis_v: [B, H, V, dh]
    with K/V already expanded to the query heads."""
    h = q.shape[1]
    kt, vt = expand_kv(text_keys.k, h), expand_kv(text_keys.v, h)
    text_logits = (q @ kt.transpose(-1, -2)) * scale  # [B, H, V, T]
    text_ok = text_keys.valid[:, None, None, :] & (text_keys.order[:, None, None, :] <= q_order[:, None, :, None])
    if q_start is not None:  # packed rows: the text of the query's own sample only
        text_ok = text_ok & (text_keys.order[:, None, None, :] >= q_start[:, None, :, None])
    text_logits = text_logits.masked_fill(~text_ok, float("-inf"))
    if mode == "none":
        nb_k, nb_v = vis_k.unsqueeze(3), vis_v.unsqueeze(3)  # [B, H, V, 1, dh]
        nb_ok = torch.ones(q.shape[0], 1, q.shape[2], 1, dtype=torch.bool, device=q.device)
    else:
        index, found = neighbours  # [B, V, n]
        b, hh, v, dh = vis_k.shape
        flat = index.reshape(b, 1, -1, 1).expand(-1, hh, -1, dh)
        nb_k = torch.gather(vis_k, 2, flat).view(b, hh, v, -1, dh)  # [B, H, V, n, dh]
        nb_v = torch.gather(vis_v, 2, flat).view(b, hh, v, -1, dh)
        nb_ok = found[:, None]
    nb_logits = (q.unsqueeze(3) @ nb_k.transpose(-1, -2)).squeeze(3) * scale  # [B, H, V, n]
    nb_logits = nb_logits.masked_fill(~nb_ok, float("-inf"))
    probs = torch.softmax(torch.cat([text_logits, nb_logits], -1), dim=-1)
    n_text = text_logits.shape[-1]
    return probs[..., :n_text] @ vt + (probs[..., n_text:].unsqueeze(3) @ nb_v).squeeze(3)
