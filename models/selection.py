"""Keeping the best-scoring tokens of each group: the one rule every token selection uses.

A group is what a budget applies to: an image (FastV, PDrop, VisiPruner, random, dominant tokens:
"keep a third of each image's tokens"), or a tile / unit of an image (uniform lattices, the
CLS-similarity knee). Layout tokens (LLaVA-NeXT's newlines) are never candidates: they are
kept, and they do not count towards a budget. Within a group tokens rank by descending score, ties
going to the earlier token, so the kept set is a function of the scores alone (the masked
reference in tests/reference.py implements the same rule independently).

Everything here has fixed shapes (sorts, running counts, scatters: no `unique`, `bincount`, boolean
indexing or value read back), so a selection costs the device no wait; the one size only the data
decides, how wide the kept stream is, comes from the host (`compact`'s `width`: models/host_sizes.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def fraction_budget(n: Tensor, keep: float, min_keep: int) -> Tensor:
    """Tokens kept of `n` candidates under a fractional budget: ceil(keep * n), at least `min_keep`
    (but never more than n)."""
    frac = torch.ceil(n.double() * keep - 1e-9).long()
    return torch.maximum(frac, n.clamp(max=min_keep))


def row_groups(*columns: Tensor) -> Tensor:
    """[B, N] consecutive ids (0, 1, ...) of the distinct tuples of `columns` ([B, N] each) within each
    row, in sorted order: a stable sort per column and a running count of changes, no `unique`."""
    b, n = columns[0].shape
    order = torch.arange(n, device=columns[0].device).expand(b, n)
    for c in reversed(columns):  # least significant first: stable sorts compose to the lexicographic order
        order = torch.gather(order, 1, torch.sort(torch.gather(c, 1, order), dim=1, stable=True).indices)
    new = torch.zeros(b, n, dtype=torch.bool, device=order.device)
    for c in columns:
        s = torch.gather(c, 1, order)
        new[:, 1:] |= s[:, 1:] != s[:, :-1]
    return torch.empty_like(order).scatter_(1, order, new.long().cumsum(1))


def group_sizes(groups: Tensor, candidates: Tensor) -> Tensor:
    """[B, N] candidates of each group (ids below N) of each row."""
    n = groups.shape[1]
    sizes = torch.zeros(groups.shape[0], n + 1, dtype=torch.long, device=groups.device)
    return sizes.scatter_add_(1, torch.where(candidates, groups, n), candidates.long())[:, :n]


def ranked_keep(scores: Tensor, groups: Tensor, candidates: Tensor, budget: Tensor) -> Tensor:
    """[B, N] bool: per row and group the `budget[row, group]` candidates of highest score, ties going to
    the earlier token (two stable sorts and a running group start; group ids below N)."""
    b, v = scores.shape
    if v == 0:
        return candidates
    by_score = torch.sort(scores.detach().float().masked_fill(~candidates, float("-inf")), dim=1, descending=True, stable=True).indices
    group = torch.gather(torch.where(candidates, groups, v), 1, by_score)  # non-candidates in a group past every other
    by_group = torch.sort(group, dim=1, stable=True).indices
    slot = torch.gather(by_score, 1, by_group)  # the tokens in (group, -score, index) order
    group = torch.gather(group, 1, by_group)
    position = torch.arange(v, device=scores.device).expand(b, v)
    starts = torch.ones_like(group, dtype=torch.bool)
    starts[:, 1:] = group[:, 1:] != group[:, :-1]
    rank = position - torch.where(starts, position, 0).cummax(1).values
    limit = torch.gather(torch.cat([budget, budget.new_zeros(b, 1)], 1), 1, group)
    return torch.zeros_like(candidates).scatter(1, slot, rank < limit)


def keep_best(scores: Tensor, groups: Tensor, candidates: Tensor, extra: Tensor, keep: float | None = None,
              threshold: float | None = None, min_keep: int = 1, budget: Tensor | None = None) -> Tensor:
    """Boolean mask [B, N] of what a selection keeps: per row and group (ids below N: `row_groups`),
    the best `budget` candidates (a fraction `keep` of the group's candidates, the candidates scoring
    above `threshold` — at least `min_keep` — or an explicit per-group `budget` [B, N]), plus every
    `extra` token."""
    sizes = group_sizes(groups, candidates)
    if budget is None:
        if keep is not None:
            budget = fraction_budget(sizes, keep, min_keep)
        else:
            above = group_sizes(groups, candidates & (scores > threshold))
            budget = torch.maximum(above, sizes.clamp(max=min_keep))
    return ranked_keep(scores, groups, candidates, torch.minimum(budget, sizes)) | extra


def compact(keep: Tensor, width: int | None = None) -> tuple[Tensor, Tensor]:
    """Indices [B, K] of each row's kept tokens in their original order and which of them are real
    [B, K]. K = `width`, the most any row keeps as the host counted it (models/host_sizes.py), or,
    when the data alone decides it (a threshold), that count read back from the device; at least 1."""
    count = keep.sum(1)
    if width is None:
        width = max(1, int(count.max())) if keep.numel() else 1
    index = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
    return index, torch.arange(index.shape[1], device=keep.device)[None] < count[:, None]


def ceil_budget(keep: float, n: int, min_keep: int = 1) -> int:
    """`fraction_budget` for one plain count (FLOPs, token counts)."""
    return max(min(min_keep, n), int(math.ceil(keep * n - 1e-9)))


def frame_steps(steps: int, keep: float) -> list[int]:
    """The time steps uniform frame subsampling keeps of a video of `steps`: ceil(keep * steps) of them,
    each centred in an equal part of the video (all of a one-step item: an image)."""
    n = ceil_budget(keep, steps)
    return [int((i + 0.5) * steps / n) for i in range(n)]
