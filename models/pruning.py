"""Pre-LLM steps that change the visual tokens entering the LLM (`PreSelect` in `models/plan.py`).

Each works on `VisualTokens` (every image of a batch, one entry per placeholder slot, with its
place), so it applies per image and per tile whatever the family:

* CLS-similarity knee (arXiv 2409.01162): the similarity of patch features to CLS is long-tailed:
  a few patches are very similar, most are not. Sorting it in descending order and cutting at the
  knee (Kneedle: the point farthest below the chord between the curve's ends, after normalising
  both axes) keeps a per-unit number of tokens (a unit has its own CLS: an image, or a tile).
* Dominant tokens (VisionZip, arXiv 2412.04467): the tokens the tower's CLS attends to most in its
  feature layer carry most of the image; VisionZip keeps them (and merges the rest into a few
  contextual tokens, which is not done here). The budget is per image.
* Pooling: k x k average pooling of the projector output on each unit's grid, the cheapest
  compression of LLaVA-style models (LLaVA-OneVision, arXiv 2408.03326, pools 2 x 2 for video frames),
  and over adjacent time steps of a video (temporal pooling: the same row and column of k_t steps merged).
* Uniform frame subsampling (`frames`): fewer time steps of each video, spread evenly; the field's
  first baseline for video token reduction. It acts on the pixels, so the tower never runs on the
  dropped steps (`MLLM.encode_images`; which steps: models/selection.py `frame_steps`); `spread_steps`
  puts the kept steps' tokens back in their slots.

Pruning returns a keep mask over each image's slots; pooling writes each image's pooled tokens
(windows in the order of their first token) into its first slots, a video's into the first slots of
each pooled group of time steps (so they keep their time). Layout tokens (LLaVA-NeXT's newlines) are
always kept, and pooling keeps them in their place among the windows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .family import VisualTokens
from .plan import PreSelect
from .selection import group_sizes, keep_best, row_groups
from .streams import Place


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


def _candidates(tokens: VisualTokens) -> Tensor:
    return tokens.place[:, Place.EXTRA] == 0


def cls_knee_keep(tokens: VisualTokens, min_keep: int = 1) -> Tensor:
    """Keep mask [T]: per unit, the tokens before the knee of its CLS-similarity curve (a count only the
    data decides: the curves are cut on the host, one length at a time)."""
    sim, cand = tokens.scores["cls_similarity"], _candidates(tokens)
    groups = row_groups(tokens.image_of_token[None], tokens.place[None, :, Place.UNIT])[0]
    sizes = group_sizes(groups[None], cand[None])[0]
    budget = torch.zeros_like(sizes)
    for size in sizes.unique().tolist():  # curves of one length are cut together (LLaVA-1.5: one batch)
        if size == 0:
            continue
        which = (sizes == size).nonzero().flatten()
        rows = torch.stack([sim[cand & (groups == g)] for g in which.tolist()])
        budget[which] = knee_counts(rows.sort(1, descending=True).values, min_keep)
    return keep_best(sim[None], groups[None], cand[None], ~cand[None], budget=budget[None])[0]


def dominant_keep(tokens: VisualTokens, pre: PreSelect) -> Tensor:
    """Keep mask [T]: per image, the ceil(keep * n) tokens the tower attends to most."""
    cand = _candidates(tokens)
    return keep_best(tokens.scores["dominance"][None], tokens.image_of_token[None], cand[None], ~cand[None], keep=pre.keep,
                     min_keep=pre.min_keep)[0]


def pool_tokens(tokens: VisualTokens, kernel: int, kernel_t: int = 1) -> VisualTokens:
    """`kernel` x `kernel` means over each unit's grid and over `kernel_t` adjacent time steps of a video
    (windows from the top-left and the first step; a partial window at an edge averages what it
    covers). The pooled tokens of each image, and of each group of `kernel_t` steps of a video, layout
    tokens among them, fill its first slots in the order of their windows' first tokens. (Fixed shapes:
    window ids are numbered below T, and the unused ones write nowhere.)"""
    place, h = tokens.place, tokens.h
    t = h.shape[0]
    image = tokens.image_of_token
    on_grid = (place[:, Place.ROW] >= 0) & _candidates(tokens)
    index = torch.arange(t, device=h.device)
    time = place[:, Place.TIME] // kernel_t
    tile = place[:, Place.UNIT] - place[:, Place.TIME]  # a video's steps are units of their own: the tile within a frame
    # a window per (image, tile, time // k_t, row // k, col // k); every other token is a window of its own
    window_row = torch.where(on_grid, place[:, Place.ROW] // kernel, -1 - index)
    window_col = torch.where(on_grid, place[:, Place.COL] // kernel, -1)
    window = row_groups(*(c[None] for c in (image, tile, time, window_row, window_col)))[0]
    size = torch.zeros(t, dtype=h.dtype, device=h.device).index_add_(0, window, torch.ones_like(h[:, 0])).clamp(min=1)
    pooled = h.new_zeros(t, h.shape[1]).index_add_(0, window, h) / size[:, None]
    first = torch.full((t,), t, device=h.device).scatter_reduce_(0, window, index, "amin")  # t: an unused window id
    by_first = first.argsort()  # windows in the order of their first token (image by image, step group by group), unused last
    used = first[by_first] < t
    lead = first[by_first].clamp(max=max(t - 1, 0))
    span = row_groups(image[None], time[None])[0]  # where pooled tokens go: each image, each pooled group of a video's steps
    span_start = torch.full((t,), t, device=h.device).scatter_reduce_(0, span, index, "amin")
    w_span = torch.where(used, span[lead], t)
    per_span = torch.zeros(t + 1, dtype=torch.long, device=h.device).index_add_(0, w_span, torch.ones_like(w_span))
    rank = torch.arange(t, device=h.device) - (per_span.cumsum(0) - per_span)[w_span]
    slot = torch.where(used, span_start[w_span.clamp(max=max(t - 1, 0))] + rank, t)  # unused windows: a row past the end

    def placed(values: Tensor, like: Tensor) -> Tensor:
        out = like.new_zeros(t + 1, *like.shape[1:])
        return out.index_copy(0, slot, values.to(like.dtype))[:t]

    out_h = placed(pooled[by_first], h)
    out_inject = None
    if tokens.inject is not None:  # a pooled token's injections are its window's mean too (they add to h)
        inject = tokens.inject
        means = inject.new_zeros(t, *inject.shape[1:]).index_add_(0, window, inject) / size[:, None, None].to(inject.dtype)
        out_inject = placed(means[by_first], inject)
    grid = on_grid[lead]
    lead_place = place[lead].clone()
    lead_place[:, Place.ROW] = torch.where(grid, place[lead, Place.ROW] // kernel, place[lead, Place.ROW])
    lead_place[:, Place.COL] = torch.where(grid, place[lead, Place.COL] // kernel, place[lead, Place.COL])
    image_start = tokens.counts.cumsum(0) - tokens.counts
    lead_place[:, Place.PATCH] = slot - image_start[image[lead]]
    out_place = placed(lead_place, place)
    keep = placed(used, torch.zeros(t, dtype=torch.bool, device=h.device))
    return tokens._replace(h=out_h, place=out_place, keep=keep, inject=out_inject)


def spread_steps(kept: Tensor, places: Tensor, counts: Tensor, steps: list[list[int]]) -> VisualTokens:
    """The tokens of the kept time steps (`kept` [K, d], encoded alone, in order) in the slots of every
    step of their items (`places` [T, len(Place)] and `counts` of the full items; `steps[i]`: item i's
    kept steps); the others are dropped (`keep` False)."""
    item = torch.repeat_interleave(torch.arange(len(counts), device=places.device), counts)
    span = int(places[:, Place.TIME].max()) + 1 if len(places) else 1
    wanted = torch.tensor([i * span + s for i, own in enumerate(steps) for s in own], device=places.device, dtype=torch.long)
    keep = torch.isin(item * span + places[:, Place.TIME], wanted)
    h = kept.new_zeros(len(places), kept.shape[1])
    h[keep] = kept
    return VisualTokens(h, places, counts, keep)


def apply_pre_llm(tokens: VisualTokens, pre: PreSelect | None) -> VisualTokens:
    """The visual tokens after the plan's pre-LLM step (unchanged without one)."""
    if pre is None:
        return tokens
    if pre.method == "pool":
        return pool_tokens(tokens, pre.kernel, pre.kernel_t or 1)
    if pre.method == "frames":  # a family that takes video subsamples the pixels (MLLM.encode_images); images stay
        return tokens
    keep = cls_knee_keep(tokens, pre.min_keep) if pre.method == "cls_knee" else dominant_keep(tokens, pre)
    return tokens._replace(keep=keep)


def scores_needed(pre: PreSelect | None) -> str | None:
    """The per-token tower score a pre-LLM step reads (families compute it while encoding)."""
    if pre is None:
        return None
    return {"cls_knee": "cls_similarity", "dominant": "dominance"}.get(pre.method)
