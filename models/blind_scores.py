"""Visual-token scores that read no attention: the field's controls for token selection.

On LLaVA-1.5-7B, 6 of 8 published pruning methods score below random selection at 66.7% and
77.8% pruning (UniPruneBench, arXiv 2511.02650), and spatially spread selection is strong
(arXiv 2502.11501); a pruning curve needs these baselines. Both are `Select` scorers, so the
engine keeps the top `budget` tokens exactly as for attention scores, before any layer.

`random`: each image draws one uniform score per token from a local CPU `torch.Generator`
seeded with `generator_seed(seed, key)`, where `key` hashes the image's pixel values (float32
bits, exact integer arithmetic, the same on every device). So the same seed and image keep the
same tokens in any batch, different images (rows) keep different ones, and the global torch RNG
(training's dropout, shuffling) is never consumed. The budget is per image.

`uniform`: the tokens of a `uniform_lattice` over each unit's grid (the image for LLaVA-1.5, each
tile for LLaVA-NeXT), the budget per unit; it needs every token of the grid present (validated in
`Plan.validate`; no CLS token among the visual tokens).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .plan import Plan, Select
from .selection import ceil_budget
from .streams import Place, Stream

_PRIME = 2**31 - 1  # hash modulus: products of two residues stay below 2**62


def image_keys(pixel_values: Tensor) -> Tensor:
    """One int64 key in [0, 2**31 - 1) per image [N]: a position-weighted sum of its pixels'
    float32 bit patterns modulo a prime (integer arithmetic, identical on CPU and GPU). Trailing
    zero padding (the empty tiles of a batch of tiled images) adds nothing: +0.0 has zero bits."""
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


def image_keys_for(plan: Plan, pixel_values: Tensor | None, images_per_row: Tensor) -> Tensor | None:
    """Per-row image keys when `plan` selects at random (else None)."""
    if not plan.draws_random or pixel_values is None or len(pixel_values) == 0:
        return None
    return row_image_keys(pixel_values, images_per_row)


def generator_seed(seed: int, key: int) -> int:
    """The seed's and the image key's 32-bit mix (the CPU generator keeps only a seed's low 32 bits;
    odd multipliers keep it one-to-one in each argument)."""
    return (key * 0x9E3779B1 + seed * 0x85EBCA77) % 2**32


def random_scores(keys: Tensor, image: Tensor, patch: Tensor, seed: int, slots: int) -> Tensor:
    """Scores [B, N] of tokens at (`image`, `patch`) [B, N] of each row: per image, `slots`
    uniform draws of a generator seeded by (`seed`, key), indexed by patch. (A generator's first
    draws do not depend on how many follow, so `slots` only needs to cover the largest patch.)"""
    table = torch.stack([torch.rand(slots, generator=torch.Generator().manual_seed(generator_seed(seed, k))) if k >= 0
                         else torch.zeros(slots) for k in keys.flatten().tolist()])
    table = table.view(*keys.shape, slots).to(image.device)
    rows = torch.arange(image.shape[0], device=image.device)[:, None]
    return table[rows, image.clamp(0, keys.shape[1] - 1), patch.clamp(0, slots - 1)]


def uniform_lattice(rows: int, k: int, cols: int | None = None) -> Tensor:
    """Indices (raster order) of `k` tokens spread evenly over a `rows` x `cols` grid (square by default).

    r = clamp(round(sqrt(k * rows / cols)), ceil(k / cols), rows) lattice rows at
    y_i = floor((i + 1/2) * rows / r); row i holds c_i = floor((i + 1) k / r) - floor(i k / r) tokens
    at x_j = floor((j + 1/2) * cols / c_i): every row and column offset is centred in its cell, and the
    rows' counts differ by at most one. For k = (grid / s)^2 this is the stride-s lattice (e.g. 64
    of 24 x 24: every third row and column, starting at 1).
    """
    cols = rows if cols is None else cols
    if not 1 <= k <= rows * cols:
        raise ValueError(f"a uniform lattice of {k} tokens does not fit a {rows}x{cols} grid")
    n_rows = min(rows, max(round(math.sqrt(k * rows / cols)), math.ceil(k / cols)))
    picked = []
    for i in range(n_rows):
        y = int((i + 0.5) * rows / n_rows)
        n = (i + 1) * k // n_rows - i * k // n_rows
        picked += [y * cols + int((j + 0.5) * cols / n) for j in range(n)]
    return torch.tensor(picked)


def on_lattice(y: Tensor, x: Tensor, rows: Tensor, cols: Tensor, k: Tensor) -> Tensor:
    """Whether cell (y, x) of a `rows` x `cols` grid is one of `uniform_lattice(rows, k, cols)`'s (all
    tensors of one shape): the lattice's closed form inverted with integer arithmetic, so every grid
    shape is answered at once on the device (the rows' and columns' offsets are floors of (2i + 1) *
    side / (2 n), which integers give exactly)."""
    n_rows = torch.minimum(rows, torch.maximum(torch.round(torch.sqrt(k.double() * rows / cols)).long(), (k + cols - 1) // cols))

    def hit(pos: Tensor, side: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
        """Whether `pos` is one of the n offsets floor((2i + 1) side / 2n), i < n, and which i."""
        guess = ((2 * pos + 1) * n) // (2 * side)
        found, which = torch.zeros_like(pos, dtype=torch.bool), torch.zeros_like(pos)
        for i in (guess - 1, guess, guess + 1):  # offsets are at least one apart: one of these, if any
            ok = (i >= 0) & (i < n) & (((2 * i + 1) * side) // (2 * n).clamp(min=1) == pos)
            found, which = found | ok, torch.where(ok, i, which)
        return found, which

    row_hit, i = hit(y, rows, n_rows)
    in_row = (i + 1) * k // n_rows.clamp(min=1) - i * k // n_rows.clamp(min=1)  # the lattice row's tokens
    return row_hit & hit(x, cols, in_row)[0]


def uniform_scores(vis: Stream, keep: float) -> Tensor:
    """Scores [B, N]: 1 for the tokens of each unit's lattice (ceil(keep * n_unit) of the unit's
    present grid, spanning its rows and columns), 0 for the others (fixed shapes: a unit's bounding
    box and count by scatters, the lattice by `on_lattice`)."""
    from .selection import fraction_budget, group_sizes, row_groups

    row, col = vis.at(Place.ROW), vis.at(Place.COL)
    on_grid = vis.valid & (row >= 0) & ~vis.extra
    b, v = row.shape
    unit = torch.where(on_grid, row_groups(vis.image, vis.at(Place.UNIT)), v)  # tokens off every grid: a group past all

    def reduce(values: Tensor, how: str, fill: int) -> Tensor:
        out = torch.full((b, v + 1), fill, dtype=values.dtype, device=values.device).scatter_reduce_(1, unit, values, how)
        return torch.gather(out, 1, unit)  # each token's unit's

    r0, c0 = reduce(row, "amin", torch.iinfo(torch.long).max), reduce(col, "amin", torch.iinfo(torch.long).max)
    rows, cols = reduce(row, "amax", -1) - r0 + 1, reduce(col, "amax", -1) - c0 + 1
    n = torch.gather(torch.cat([group_sizes(unit.clamp(max=max(v - 1, 0)), on_grid), row.new_zeros(b, 1)], 1), 1, unit)
    k = fraction_budget(n, keep, 1)
    on = on_lattice(row - r0, col - c0, rows.clamp(min=1), cols.clamp(min=1), k)
    return (on & on_grid).float()


def blind_scores(sel: Select, vis: Stream, keys: Tensor | None) -> Tensor:
    """Scores [B, N] of a `random` or `uniform` selection for the tokens of `vis`."""
    if vis.n == 0:
        return torch.zeros(vis.valid.shape, device=vis.valid.device)
    if sel.scorer == "uniform":
        return uniform_scores(vis, sel.keep)
    if keys is None:
        raise ValueError("select.scorer=random draws per image and needs the images' keys: pass "
                         "image_keys=models.blind_scores.image_keys_for(plan, pixel_values, images_per_row) to run_decoder")
    return random_scores(keys, vis.image, vis.patch, sel.seed, int(vis.patch.max()) + 1)
