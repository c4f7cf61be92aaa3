"""Positions of packed rows: the family's own rule applied to each sample alone.

A family computes RoPE position ids row by row (1-D: the order; M-RoPE: from the row's image
placeholders and grids). A packed row holds several samples, so its positions are those of its samples
laid out as rows of their own: the samples are gathered into `[S, longest sample]` rows (in row order,
so their images stay in batch order), the family's rule runs on them, and the ids are scattered back.
No family needs a packing rule of its own.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def sample_rows(order: Tensor, start: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Each sample's tokens as a row: `index` [S, n] into the flattened [B * L] tokens and which are
    real [S, n] (samples in row order; n: the longest sample). `order`/`start`: models/streams.py Layout."""
    b, length = valid.shape
    rows = torch.arange(b, device=valid.device)[:, None].expand(b, length)
    key = (rows * length + start)[valid]  # one id per (row, sample), increasing along the flattened rows
    flat = torch.arange(b * length, device=valid.device).view(b, length)[valid]
    _, sample, counts = torch.unique_consecutive(key, return_inverse=True, return_counts=True)
    place = (order - start)[valid]
    n = int(counts.max()) if counts.numel() else 1
    index = torch.zeros(len(counts), n, dtype=torch.long, device=valid.device)
    real = torch.zeros(len(counts), n, dtype=torch.bool, device=valid.device)
    index[sample, place], real[sample, place] = flat, True
    return index, real


def packed_positions(rule: Callable[[Tensor, Tensor], Tensor], input_ids: Tensor, attention_mask: Tensor, order: Tensor,
                     start: Tensor) -> Tensor:
    """Position ids of packed rows ([B, L], or [..., B, L] for M-RoPE; padding 0): `rule(ids, mask)`,
    the family's rule over right-padded rows, run on the samples as rows of their own."""
    b, length = input_ids.shape
    index, real = sample_rows(order, start, attention_mask.bool())
    ids = input_ids.flatten()[index].masked_fill(~real, 0)
    per_sample = rule(ids, real.long())
    out = per_sample.new_zeros(*per_sample.shape[:-2], b * length)
    out[..., index[real]] = per_sample[..., real]
    return out.view(*per_sample.shape[:-2], b, length)
