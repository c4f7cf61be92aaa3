"""Visual-token scores that read no attention: the field's controls for token selection.

On LLaVA-1.5-7B, 6 of 8 published pruning methods score below random selection at 66.7% and
77.8% pruning (UniPruneBench, arXiv 2511.02650), and spatially spread selection is strong
(arXiv 2502.11501); a pruning curve needs these baselines. Both are `Select` scorers, so the
engine keeps the top `budget` tokens exactly as for attention scores, before any layer.

`random`: each image draws one uniform score per patch slot from a local CPU `torch.Generator`
seeded with `generator_seed(seed, key)`, where `key` hashes the image's pixel values (float32
bits, exact integer arithmetic, the same on every device). So the same seed and image keep the same tokens in
any batch, different images (rows) keep different ones, and the global torch RNG (training's
dropout, shuffling) is never consumed.

`uniform`: the tokens of a `uniform_lattice` over the g x g patch grid, which needs every patch
of the image present (validated in `Plan.validate`; no CLS token among the visual tokens).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .plan import Plan, Select

_PRIME = 2**31 - 1  # hash modulus: products of two residues stay below 2**62


def image_keys(pixel_values: Tensor) -> Tensor:
    """One int64 key in [0, 2**31 - 1) per image [N]: a position-weighted sum of its pixels'
    float32 bit patterns modulo a prime (integer arithmetic, identical on CPU and GPU)."""
    bits = pixel_values.detach().float().contiguous().view(torch.int32).reshape(len(pixel_values), -1).long()
    weights = torch.arange(1, bits.shape[1] + 1, device=bits.device) * 2654435761 % _PRIME
    return (bits % _PRIME * weights % _PRIME).sum(1) % _PRIME


def row_image_keys(pixel_values: Tensor, images_per_row: Tensor) -> Tensor:
    """Keys [B, I] of each row's images, in order (rows have `images_per_row` [B] images; -1 pads)."""
    keys = image_keys(pixel_values)
    n_max = max(1, int(images_per_row.max()))
    first = images_per_row.cumsum(0) - images_per_row
    slot = torch.arange(n_max, device=keys.device)
    index = (first[:, None].to(keys.device) + slot).clamp(max=len(keys) - 1)
    return torch.where(slot < images_per_row[:, None].to(keys.device), keys[index], -1)


def image_keys_for(plan: Plan, vis_valid: Tensor, pixel_values: Tensor | None, tokens_per_image: int) -> Tensor | None:
    """Per-row image keys when `plan` selects at random (else None); `vis_valid` [B, V] marks each
    row's `<image>` tokens, `tokens_per_image` of them per image."""
    if not plan.draws_random or pixel_values is None or len(pixel_values) == 0:
        return None
    return row_image_keys(pixel_values, vis_valid.sum(1) // tokens_per_image)


def generator_seed(seed: int, key: int) -> int:
    """The seed's and the image key's 32-bit mix (the CPU generator keeps only a seed's low 32 bits;
    odd multipliers keep it one-to-one in each argument)."""
    return (key * 0x9E3779B1 + seed * 0x85EBCA77) % 2**32


def random_scores(keys: Tensor, image: Tensor, patch: Tensor, seed: int, slots: int) -> Tensor:
    """Scores [B, N] of tokens at (`image`, `patch`) [B, N] of each row: per image, `slots`
    uniform draws of a generator seeded by (`seed`, key), indexed by patch."""
    table = torch.stack([torch.rand(slots, generator=torch.Generator().manual_seed(generator_seed(seed, k))) if k >= 0
                         else torch.zeros(slots) for k in keys.flatten().tolist()])
    table = table.view(*keys.shape, slots).to(image.device)
    rows = torch.arange(image.shape[0], device=image.device)[:, None]
    return table[rows, image.clamp(0, keys.shape[1] - 1), patch.clamp(0, slots - 1)]


def uniform_lattice(grid: int, k: int) -> Tensor:
    """Patch indices (raster order) of `k` tokens spread evenly over a `grid` x `grid` image.

    r = clamp(round(sqrt(k)), ceil(k / grid), grid) lattice rows at y_i = floor((i + 1/2) * grid / r);
    row i holds c_i = floor((i + 1) k / r) - floor(i k / r) tokens at x_j = floor((j + 1/2) * grid / c_i):
    every row and column offset is centred in its cell, and the rows' counts differ by at most one.
    For k = (grid / s)^2 this is the stride-s lattice (e.g. 64 of 24 x 24: every third row and
    column, starting at 1).
    """
    if not 1 <= k <= grid * grid:
        raise ValueError(f"a uniform lattice of {k} tokens does not fit a {grid}x{grid} grid")
    rows = min(grid, max(round(math.sqrt(k)), math.ceil(k / grid)))
    picked = []
    for i in range(rows):
        y = int((i + 0.5) * grid / rows)
        cols = (i + 1) * k // rows - i * k // rows
        picked += [y * grid + int((j + 0.5) * grid / cols) for j in range(cols)]
    return torch.tensor(picked)


def uniform_scores(image: Tensor, patch: Tensor, grid: int, k: int) -> Tensor:
    """Scores [B, N]: the `uniform_lattice(grid, k)` tokens of every image first, then the others;
    ties (only when a row holds several images) go to the earlier token."""
    on = torch.zeros(grid * grid + 1, dtype=torch.bool)
    on[uniform_lattice(grid, k)] = True
    on = on.to(patch.device)[patch.clamp(0, grid * grid)]
    slot = (image * (grid * grid + 1) + patch).double()
    return -(slot + (~on).double() * 2**40)


def blind_scores(sel: Select, image: Tensor, patch: Tensor, grid: int, keys: Tensor | None) -> Tensor:
    """Scores [B, N] of a `random` or `uniform` selection for tokens at (`image`, `patch`)."""
    if image.numel() == 0:
        return torch.zeros(image.shape, device=image.device)
    if sel.scorer == "uniform":
        return uniform_scores(image, patch, grid, sel.budget(grid * grid))
    if keys is None:
        raise ValueError("select.scorer=random draws per image and needs the images' keys: pass "
                         "image_keys=models.blind_scores.image_keys_for(plan, layout.vis_valid, pixel_values, n_v) to run_decoder")
    return random_scores(keys, image, patch, sel.seed, grid * grid + 1)
