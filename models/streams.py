"""Token streams: the decoder keeps text and visual tokens as two separate tensors.

Every token carries its *sequence order* (`order`: its place in the prompt, 0..L-1 over the valid
tokens; causality is computed from it) and the RoPE tables of its position (`cos`/`sin`, computed
once by the model family: 1-D positions for LLaVA, kept apart from the order so that other
position rules fit). Tokens can leave a stream (pruning, withdrawal) or be left out of a layer's
queries/keys (frozen or text-only layers) without changing what the remaining tokens compute:
order inside a stream never matters for correctness, only `order` does, which is what lets every
plan run on physically smaller tensors instead of masking a full sequence.

Visual tokens also carry their `place` (which image or video, which token of it, which tile or time
step, where on that grid, whether it is a layout token such as LLaVA-NeXT's row newline): what plans
that work per image, per tile, per time step or on a grid read. A token's *grid* is its (IMAGE, UNIT):
a tile of an image, or one time step of a video (whose UNIT is its TIME).

In a packed row (several samples one after another, data/packing.py) every token also carries its
sample's `start` (the order of the sample's first token): attention never crosses it
(models/packed_attention.py), and positions restart at it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import reduce
from enum import IntEnum
from typing import NamedTuple

import torch
from torch import Tensor


class Place(IntEnum):
    """Columns of `Stream.place` [B, N, len(Place)] (long) for visual tokens."""

    SLOT = 0  # index among the row's visual slots in the prompt (`Layout.vis_index`)
    IMAGE = 1  # which image of the row
    PATCH = 2  # index of the token inside its image's span (0..n_i-1)
    UNIT = 3  # which grid the token belongs to inside its image: a tile (LLaVA-NeXT), the image (LLaVA-1.5), a
              # video's time step (then equal to TIME)
    ROW = 4  # row on its unit's grid (-1: not on a grid, e.g. a kept CLS token or a newline)
    COL = 5  # column on its unit's grid
    EXTRA = 6  # 1: a layout token (LLaVA-NeXT's row newline), kept by selections and pooling
    TIME = 7  # time step of its video (a temporal grid step of 2 frames for Qwen); 0 for a still image


class Stream(NamedTuple):
    """Tokens of one kind. Per-token tensors are `[B, N, ...]`; padded slots have `valid=False`.

    A NamedTuple (like `Keys`) so that sharding hooks (ZeRO-3, FSDP2) find the tensors a decoder
    layer receives and returns."""

    h: Tensor  # hidden states [B, N, d]
    order: Tensor  # sequence order [B, N] (long): causality compares it
    valid: Tensor  # [B, N] bool
    cos: Tensor  # RoPE tables of each token's position [B, N, head_dim]
    sin: Tensor
    place: Tensor | None = None  # visual only: [B, N, len(Place)] (long)
    embed: Tensor | None = None  # visual only: layer-0 embedding (projector output) [B, N, d]
    start: Tensor | None = None  # packed rows only: sequence order of the first token of each token's sample [B, N]
    inject: Tensor | None = None  # visual only: [B, N, K, d] added to the token after decoder layers 0..K-1 (`injected`)

    @property
    def n(self) -> int:
        return self.h.shape[1]

    def at(self, column: Place) -> Tensor:
        """One `place` column [B, N] (visual streams)."""
        return self.place[..., column]

    @property
    def image(self) -> Tensor:
        return self.at(Place.IMAGE)

    @property
    def patch(self) -> Tensor:
        return self.at(Place.PATCH)

    @property
    def extra(self) -> Tensor:
        """[B, N] bool: layout tokens (newlines) that selections keep."""
        return self.at(Place.EXTRA).bool()

    def gather(self, index: Tensor, valid: Tensor | None = None) -> "Stream":
        """Keep the tokens `index` [B, K] of each row (e.g. top-k visual tokens); `valid` marks padding."""
        out = {}
        for name, t in zip(self._fields, self):
            if t is not None:
                idx = index.view(*index.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
                out[name] = torch.gather(t, 1, idx)
        if valid is not None:
            out["valid"] = out["valid"] & valid
        return self._replace(**out)

    def with_h(self, h: Tensor) -> "Stream":
        return self._replace(h=h)


def injected(vis: Stream, layer: int) -> Stream:
    """The visual stream after decoder layer `layer` takes its injection: Qwen3-VL's DeepStack adds
    features of earlier tower blocks to the visual tokens after each of the first K layers. The
    features travel in the stream (`Stream.inject`), so they follow their tokens through every
    selection, pooling and drop, and a token that left takes its injections with it. They are added to
    the hidden state whether the layer updated the token or not (a frozen token still receives them)
    and to `embed`, the bypass stream that ViCA-style layers read their visual K/V from."""
    if vis.inject is None or layer >= vis.inject.shape[2] or vis.n == 0:
        return vis
    add = vis.inject[:, :, layer].to(vis.h.dtype)
    return vis._replace(h=vis.h + add, embed=None if vis.embed is None else vis.embed + add)


def images_per_row(vis: Stream) -> Tensor:
    """[B] images of each row of a visual stream that still holds every image (numbered from 0)."""
    if vis.n == 0:
        return vis.valid.new_zeros(vis.valid.shape[0], dtype=torch.long)
    return (vis.image.masked_fill(~vis.valid, -1).max(1).values + 1).clamp(min=0)


class RopeTable(NamedTuple):
    """RoPE tables of the positions 0..P-1 ([1, P, head_dim] each): what renumbered tokens gather."""

    cos: Tensor
    sin: Tensor

    def at(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        index = positions.clamp(0, self.cos.shape[1] - 1)
        return self.cos[0][index], self.sin[0][index]


def renumbered(text: Stream, vis: Stream, table: RopeTable) -> tuple[Stream, Stream]:
    """Both streams with every token's RoPE position replaced by its rank among the tokens present
    (valid text and visual tokens, in sequence order) of its sample: PyramidDrop's renumbering after a drop."""
    big = torch.iinfo(text.order.dtype).max
    present = torch.cat([text.order.masked_fill(~text.valid, big), vis.order.masked_fill(~vis.valid, big)], 1).sort(1).values
    out = []
    for stream in (text, vis):
        rank = torch.searchsorted(present, stream.order.contiguous())
        if stream.start is not None:  # packed rows: the rank inside the token's own sample
            rank = rank - torch.searchsorted(present, stream.start.contiguous())
        cos, sin = table.at(rank)
        out.append(stream._replace(cos=cos.to(stream.cos.dtype), sin=sin.to(stream.sin.dtype)))
    return out[0], out[1]


def present_count(text: Stream, vis: Stream) -> Tensor:
    """[B] tokens present (valid) in both streams."""
    return text.valid.sum(1) + vis.valid.sum(1)


def concat(streams: list[Stream]) -> Stream:
    """Concatenate along tokens (only the fields every stream has)."""
    if len(streams) == 1:
        return streams[0]
    common = [name for name in Stream._fields if all(getattr(s, name) is not None for s in streams)]
    return Stream(**{k: torch.cat([getattr(s, k) for s in streams], 1) for k in common})


def empty_like_visual(text: Stream) -> Stream:
    """A visual stream with zero tokens (text-only batches)."""
    b, _, d = text.h.shape
    z = text.h.new_zeros(b, 0, d)
    return Stream(
        h=z,
        order=text.order.new_zeros(b, 0),
        valid=text.valid.new_zeros(b, 0),
        cos=text.cos[:, :0],
        sin=text.sin[:, :0],
        place=text.order.new_zeros(b, 0, len(Place)),
        embed=z,
        start=None if text.start is None else text.start[:, :0],
    )


def sample_starts(order: Tensor, sample_index: Tensor) -> Tensor:
    """[B, L] the order of the first token of each token's sample (samples must be consecutive)."""
    if sample_index.shape != order.shape:
        raise ValueError(f"sample_index has shape {tuple(sample_index.shape)}, input_ids {tuple(order.shape)}: give one "
                         "sample number per token")
    step = sample_index[:, 1:] - sample_index[:, :-1]
    if bool((step < 0).any()):
        raise ValueError("sample_index must be non-decreasing along each row (a packed row holds its samples one "
                         "after another, data/packing.py)")
    new = torch.ones_like(sample_index, dtype=torch.bool)
    new[:, 1:] = step != 0
    return torch.where(new, order, 0).cummax(1).values


def visual_mask(input_ids: Tensor, attention_mask: Tensor, visual_token_ids: tuple[int, ...]) -> Tensor:
    """[B, L] bool: the valid tokens that are visual placeholders (any of `visual_token_ids`)."""
    hits = [input_ids == token for token in visual_token_ids]  # (Python ints: no id tensor copied to the device)
    return reduce(operator.or_, hits) & attention_mask.bool()


@dataclass
class Layout:
    """Where text and image tokens sit in the original `[B, L]` sequence."""

    order: Tensor  # [B, L] sequence order (cumulative over the attention mask, like HF generate's positions)
    text_index: Tensor  # [B, T] indices of text (non-image) tokens, valid ones first, then padding
    text_valid: Tensor  # [B, T]
    vis_index: Tensor  # [B, V] indices of image tokens, padded
    vis_valid: Tensor  # [B, V]
    start: Tensor | None = None  # packed rows: [B, L] order of the first token of each token's sample
    sample: Tensor | None = None  # packed rows: [B, L] which sample of its row each token belongs to (0, 1, ...)

    @staticmethod
    def from_inputs(input_ids: Tensor, attention_mask: Tensor, image_token_id: int | tuple[int, ...],
                    sample_index: Tensor | None = None, widths: tuple[int, int] | None = None) -> "Layout":
        """`image_token_id`: the visual placeholder id(s) (Qwen's image and video pads); `sample_index`
        [B, L]: for packed rows, the sample of its row each token belongs to (consecutive,
        non-decreasing: 0, 0, ..., 1, 1, ...; data/packing.py); None: a row is one sample. `widths`:
        the text and visual streams' widths as the host knows them (`BatchSizes`), else read back."""
        mask = attention_mask.bool()
        order = (mask.long().cumsum(-1) - 1).clamp(min=0)
        start = None
        if sample_index is not None:
            start = sample_starts(order, sample_index.to(order.device))
        is_image = visual_mask(input_ids, mask, image_token_id if isinstance(image_token_id, tuple) else (image_token_id,))
        n_image = is_image.sum(1)
        n_text = input_ids.shape[1] - n_image
        # A stable sort puts text (0) before padding (1) before image (2) tokens, keeping each group's
        # order: the text stream is then ordered (valid tokens first, by position), which is what lets
        # text-only layers attend with SDPA's is_causal instead of a mask (models/attention.py).
        kind = 2 * is_image.to(torch.int8) + (~mask).to(torch.int8)  # is_image excludes padding
        sort = torch.sort(kind, dim=1, stable=True).indices
        t_max, v_max = widths if widths is not None else (int(n_text.max()), int(n_image.max()))
        ar_t = torch.arange(t_max, device=input_ids.device)
        text_index = sort[:, :t_max]
        text_valid = (ar_t[None] < n_text[:, None]) & torch.gather(mask, 1, text_index)
        # image tokens of a row start right after its text tokens in `sort`
        ar_v = torch.arange(v_max, device=input_ids.device)
        vis_slot = (n_text[:, None] + ar_v[None]).clamp(max=input_ids.shape[1] - 1)
        vis_index = torch.gather(sort, 1, vis_slot)
        vis_valid = ar_v[None] < n_image[:, None]
        return Layout(order, text_index, text_valid, vis_index, vis_valid, start, sample_index)

    @property
    def image_tokens_per_row(self) -> Tensor:
        return self.vis_valid.sum(1)
