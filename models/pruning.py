"""Pre-LLM visual token pruning by similarity to the CLS token (arXiv 2409.01162).

The similarity of patch features to CLS is long-tailed: a few patches are very similar, most are
not. Sorting it in descending order and cutting at the knee (Kneedle: the point farthest below the
chord between the curve's ends, after normalising both axes) keeps a per-image number of tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def knee_counts(sorted_desc: Tensor, min_keep: int = 1) -> Tensor:
    """Tokens to keep [N] for each descending curve [N, n] (the knee point is kept)."""
    n = sorted_desc.shape[1]
    if n < 3:
        return torch.full(sorted_desc.shape[:1], n, device=sorted_desc.device)
    x = torch.linspace(0, 1, n, device=sorted_desc.device, dtype=sorted_desc.dtype)
    lo, hi = sorted_desc[:, -1:], sorted_desc[:, :1]
    y = (sorted_desc - lo) / (hi - lo).clamp_min(1e-12)
    gap = (1 - x)[None] - y  # distance below the chord from (0, 1) to (1, 0), up to a constant
    return (gap.argmax(1) + 1).clamp(min=min(min_keep, n))


def cls_knee_keep(features: Tensor, cls: Tensor, min_keep: int = 1) -> Tensor:
    """Boolean keep mask [N, n_v] over each image's patch features [N, n_v, d] given CLS [N, d]."""
    sim = F.cosine_similarity(features.float(), cls.float()[:, None], dim=-1)
    order = sim.argsort(1, descending=True)
    counts = knee_counts(torch.gather(sim, 1, order), min_keep)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(sim.shape[1], device=sim.device).expand_as(order))
    return rank < counts[:, None]
