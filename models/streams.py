"""Token streams: the decoder keeps text and visual tokens as two separate tensors.

Every token carries its *original* sequence position (RoPE and causality are computed from it), so
tokens can leave a stream (pruning, withdrawal) or be left out of a layer's queries/keys (frozen or
text-only layers) without changing what the remaining tokens compute. Order inside a stream never
matters for correctness, only `pos` does; that is what lets every plan run on physically smaller
tensors instead of masking a full sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


class Stream(NamedTuple):
    """Tokens of one kind. Per-token tensors are `[B, N, ...]`; padded slots have `valid=False`.

    A NamedTuple (like `Keys`) so that sharding hooks (ZeRO-3, FSDP2) find the tensors a decoder
    layer receives and returns."""

    h: Tensor  # hidden states [B, N, d]
    pos: Tensor  # original positions [B, N] (long)
    valid: Tensor  # [B, N] bool
    cos: Tensor  # RoPE tables for `pos` [B, N, head_dim]
    sin: Tensor
    patch: Tensor | None = None  # visual only: patch index inside its image [B, N]
    image: Tensor | None = None  # visual only: which image of the row [B, N]
    embed: Tensor | None = None  # visual only: layer-0 embedding (projector output) [B, N, d]

    @property
    def n(self) -> int:
        return self.h.shape[1]

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
    zl = text.pos.new_zeros(b, 0)
    return Stream(
        h=z,
        pos=zl,
        valid=text.valid.new_zeros(b, 0),
        cos=text.cos[:, :0],
        sin=text.sin[:, :0],
        patch=zl,
        image=zl,
        embed=z,
    )


@dataclass
class Layout:
    """Where text and image tokens sit in the original `[B, L]` sequence."""

    positions: Tensor  # [B, L] RoPE positions (cumulative over the attention mask, like HF generate)
    text_index: Tensor  # [B, T] indices of text (non-image) tokens, valid ones first, then padding
    text_valid: Tensor  # [B, T]
    vis_index: Tensor  # [B, V] indices of image tokens, padded
    vis_valid: Tensor  # [B, V]

    @staticmethod
    def from_inputs(input_ids: Tensor, attention_mask: Tensor, image_token_id: int) -> "Layout":
        mask = attention_mask.bool()
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        is_image = (input_ids == image_token_id) & mask
        n_image = is_image.sum(1)
        n_text = input_ids.shape[1] - n_image
        # A stable sort puts text (0) before padding (1) before image (2) tokens, keeping each group's
        # order: the text stream is then ordered (valid tokens first, by position), which is what lets
        # text-only layers attend with SDPA's is_causal instead of a mask (models/attention.py).
        kind = 2 * is_image.to(torch.int8) + (~mask).to(torch.int8)  # is_image excludes padding
        order = torch.sort(kind, dim=1, stable=True).indices
        t_max, v_max = int(n_text.max()), int(n_image.max())
        ar_t = torch.arange(t_max, device=input_ids.device)
        text_index = order[:, :t_max]
        text_valid = (ar_t[None] < n_text[:, None]) & torch.gather(mask, 1, text_index)
        # image tokens of a row start right after its text tokens in `order`
        ar_v = torch.arange(v_max, device=input_ids.device)
        vis_slot = (n_text[:, None] + ar_v[None]).clamp(max=input_ids.shape[1] - 1)
        vis_index = torch.gather(order, 1, vis_slot)
        vis_valid = ar_v[None] < n_image[:, None]
        return Layout(positions, text_index, text_valid, vis_index, vis_valid)
