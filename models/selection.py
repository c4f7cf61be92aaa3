"""Keeping the best-scoring tokens of each group: the one rule every token selection uses.

A group is what a budget applies to: an image (FastV, PDrop, VisiPruner, random, dominant tokens:
"keep a third of each image's tokens"), or a tile / unit of an image (uniform lattices, the
CLS-similarity knee). Layout tokens (LLaVA-NeXT's row newlines) are never candidates: they are
kept, and they do not count towards a budget. Within a group tokens rank by descending score, ties
going to the earlier token, so the kept set is a function of the scores alone (the masked
reference in tests/reference.py implements the same rule independently).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def fraction_budget(n: Tensor, keep: float, min_keep: int) -> Tensor:
    """Tokens kept of `n` candidates [G] under a fractional budget: ceil(keep * n), at least
    `min_keep` (but never more than n)."""
    frac = torch.ceil(n.double() * keep - 1e-9).long()
    return torch.maximum(frac, n.clamp(max=min_keep))


def dense_groups(*columns: Tensor) -> tuple[Tensor, int]:
    """Consecutive group ids [...] (0..G-1) for the distinct tuples of `columns` (same shape)."""
    stacked = torch.stack([c.reshape(-1) for c in columns], 1)
    if stacked.numel() == 0:
        return columns[0].new_zeros(columns[0].shape), 0
    unique, inverse = torch.unique(stacked, dim=0, return_inverse=True)
    return inverse.view(columns[0].shape), unique.shape[0]


def rank_in_groups(scores: Tensor, groups: Tensor, candidates: Tensor, n_groups: int) -> Tensor:
    """Rank [N] of each candidate among its group's candidates by descending score (ties: earlier
    index first); non-candidates get a rank past every budget. Flat inputs [N]."""
    n = scores.numel()
    s = scores.masked_fill(~candidates, float("-inf"))
    by_score = torch.sort(s, descending=True, stable=True).indices
    g = torch.where(candidates, groups, n_groups)[by_score]  # non-candidates last
    by_group = torch.sort(g, stable=True).indices
    perm = by_score[by_group]  # sorted by (group, -score, index)
    g_sorted = g[by_group]
    position = torch.arange(n, device=scores.device)
    starts = torch.zeros(n_groups + 1, dtype=torch.long, device=scores.device)
    counts = torch.bincount(g_sorted, minlength=n_groups + 1)
    starts[1:] = counts.cumsum(0)[:-1]
    rank_sorted = position - starts[g_sorted]
    rank = torch.empty_like(rank_sorted)
    rank[perm] = rank_sorted
    return torch.where(candidates, rank, n + 1)


def keep_best(scores: Tensor, groups: Tensor, candidates: Tensor, extra: Tensor, n_groups: int,
              keep: float | None = None, threshold: float | None = None, min_keep: int = 1,
              budget: Tensor | None = None) -> Tensor:
    """Boolean mask [N] of what a selection keeps: per group, the best `budget` candidates (a
    fraction `keep` of the group's candidates, the candidates scoring above `threshold` — at
    least `min_keep` — or an explicit per-group `budget` [G]), plus every `extra` token."""
    sizes = torch.bincount(groups[candidates], minlength=n_groups)
    if budget is None:
        if keep is not None:
            budget = fraction_budget(sizes, keep, min_keep)
        else:
            above = torch.bincount(groups[candidates & (scores > threshold)], minlength=n_groups)
            budget = torch.maximum(above, sizes.clamp(max=min_keep))
    budget = torch.minimum(budget, sizes)
    rank = rank_in_groups(scores, groups, candidates, n_groups)
    limit = torch.cat([budget, budget.new_zeros(1)])[groups.clamp(0, n_groups)]
    return (candidates & (rank < limit)) | extra


def compact(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Indices [B, K] of each row's kept tokens in their original order (K = the most any row
    keeps, at least 1) and which of them are real [B, K]."""
    count = keep.sum(1)
    k = max(1, int(count.max())) if keep.numel() else 1
    index = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :k]
    return index, torch.arange(index.shape[1], device=keep.device)[None] < count[:, None]


def ceil_budget(keep: float, n: int, min_keep: int = 1) -> int:
    """`fraction_budget` for one plain count (FLOPs, token counts)."""
    return max(min(min_keep, n), int(math.ceil(keep * n - 1e-9)))


def frame_steps(steps: int, keep: float) -> list[int]:
    """The time steps uniform frame subsampling keeps of a video of `steps`: ceil(keep * steps) of them,
    each centred in an equal part of the video (all of a one-step item: an image)."""
    n = ceil_budget(keep, steps)
    return [int((i + 0.5) * steps / n) for i in range(n)]
