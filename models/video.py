"""Video inputs: transformers' separate image and video lists become one list of visual items in
prompt order.

transformers' Qwen models take images and videos apart (`pixel_values` + `image_grid_thw`,
`pixel_values_videos` + `video_grid_thw` + `second_per_grid_ts`) and fill each kind's placeholders
in order. The model here holds one list of *visual items* (a still image is an item of one time
step, a video one of `t` steps) in the order their placeholders appear row by row, which is the
order the visual stream needs, with each item's `step_seconds`: the seconds one temporal grid step
spans (0 for an image), what places a video's steps in time (Qwen2.5-VL's M-RoPE). The data path
writes that list directly; `merge_in_prompt_order` makes it from transformers' inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class VisualItems(NamedTuple):
    """Images and videos of a batch in prompt order (the family's layout: Qwen's patches concatenated)."""

    pixel_values: Tensor  # [sum of patches, patch pixels]
    sizes: Tensor  # [n, 3] each item's patch grid (t, h, w)
    step_seconds: Tensor  # [n] float32: seconds per temporal grid step (0 for a still image)


def kinds_in_prompt_order(input_ids: Tensor, attention_mask: Tensor, token_ids: tuple[int, int],
                          tokens: tuple[list[int], list[int]]) -> list[tuple[int, int]]:
    """(kind, index) of every visual item in prompt order, row by row: kind 0 = image, 1 = video;
    `token_ids` are their placeholder ids and `tokens` their placeholder counts per item. Each kind's
    items fill that kind's placeholders in order (transformers' rule); one item may fill several
    runs of placeholders (a video whose steps are written apart, with text between them)."""
    order: list[tuple[int, int]] = []
    started, left = [0, 0], [0, 0]  # per kind: items started, placeholders the current item still needs
    ids = torch.tensor(token_ids, device=input_ids.device)
    for row, mask in zip(input_ids, attention_mask.bool()):
        runs, counts = torch.unique_consecutive(row[mask & torch.isin(row, ids)], return_counts=True)
        for token, count in zip(runs.tolist(), counts.tolist()):
            kind = token_ids.index(token)
            while count:
                if left[kind] == 0:
                    if started[kind] == len(tokens[kind]):
                        raise _mismatch(kind, token_ids, tokens)
                    order.append((kind, started[kind]))
                    left[kind] = tokens[kind][started[kind]]
                    started[kind] += 1
                used = min(count, left[kind])
                count, left[kind] = count - used, left[kind] - used
    for kind in (0, 1):
        if started[kind] != len(tokens[kind]) or left[kind]:
            raise _mismatch(kind, token_ids, tokens)
    return order


def _mismatch(kind: int, token_ids: tuple[int, int], tokens: tuple[list[int], list[int]]) -> ValueError:
    name = ("image", "video")[kind]
    return ValueError(f"the {len(tokens[kind])} {name}(s) given fill {sum(tokens[kind])} placeholder tokens (id {token_ids[kind]}) "
                      f"but the prompts hold another number: each {name} needs exactly its count (t * h * w / merge^2), in "
                      "prompt order")


def merge_in_prompt_order(input_ids: Tensor, attention_mask: Tensor, token_ids: tuple[int, int], merge: int,
                          images: tuple[Tensor, Tensor] | None, videos: tuple[Tensor, Tensor, Tensor | None] | None) -> VisualItems | None:
    """One `VisualItems` from transformers' image inputs (`pixel_values`, `image_grid_thw`) and video
    inputs (`pixel_values_videos`, `video_grid_thw`, `second_per_grid_ts`: None gives 0 s per step),
    for prompts whose placeholders (`token_ids`: image, video) take t*h*w / merge^2 tokens per item (None: no items)."""
    kinds = [split_items(*images, None) if images is not None else None, split_items(*videos) if videos is not None else None]
    if kinds[0] is not None and bool((kinds[0][1][:, 0] != 1).any()):
        raise ValueError(f"image grids {kinds[0][1].tolist()} must have t=1 (a still image); give videos as pixel_values_videos")
    tokens = tuple([] if k is None else (k[1].prod(-1) // merge**2).tolist() for k in kinds)
    order = kinds_in_prompt_order(input_ids, attention_mask, token_ids, tokens)
    if not order:
        return None
    return VisualItems(torch.cat([kinds[k][0][i] for k, i in order]), torch.stack([kinds[k][1][i] for k, i in order]),
                       torch.stack([kinds[k][2][i] for k, i in order]))


def split_items(pixels: Tensor, grids: Tensor, seconds: Tensor | None) -> tuple[list[Tensor], Tensor, Tensor]:
    """Each item's patches, its grid and its seconds per step (0 when not given)."""
    grids = grids.to(pixels.device).long()
    patches = grids.prod(-1)
    if pixels.dim() != 2 or pixels.shape[0] != int(patches.sum()):
        raise ValueError(f"pixel values of shape {tuple(pixels.shape)}: expected [{int(patches.sum())}, patch pixels] for "
                         f"the grids {grids.tolist()} (every item's patches, concatenated)")
    if seconds is None:
        seconds = torch.zeros(len(grids), device=pixels.device)
    seconds = seconds.detach().reshape(-1).to(pixels.device, torch.float32)
    if len(seconds) != len(grids):
        raise ValueError(f"second_per_grid_ts gives {len(seconds)} value(s) for {len(grids)} video(s): one per video")
    return list(pixels.split(patches.tolist())), grids, seconds
