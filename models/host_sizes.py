"""The sizes of a batch that the host knows before the batch reaches the device.

Every shape a forward pass needs (the text and visual streams' widths, the tokens each selection
keeps, the supervised tokens of the loss) follows from what the collator already has on the host:
each row's placeholders, each image's size and row, the labels. Computed once there (`BatchSizes.of`
on the CPU batch: train/module.py), they let prefill and training run without reading a device value
back (models/dispatch_count.py counts the reads; tests/test_host_syncs.py). A forward given no sizes
computes them itself from its inputs, reading them back once.

`VisualCounts` follows the visual tokens through a plan on the host: per row and image the
selectable tokens (per unit while an image's grid is whole, what uniform lattices and pooling budget
by) and the layout tokens, which every selection keeps. Budgets are the ones the device applies
(`Select.budget`, `Route.budget`, `flops.ImageTokens.pre_llm`), so the widths are exact; what no host
can know (a threshold's kept count, the CLS-similarity knee) makes them unknown (None), and the
device's count is read back instead.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch
from torch import Tensor

from .flops import ImageTokens


class ImageTokenMismatch(ValueError):
    """The `<image>` tokens of the prompts do not match the visual tokens of the images given."""


@dataclass(frozen=True)
class BatchSizes:
    """A batch's sizes on the host (`of` builds them)."""

    length: int  # L, the padded prompt length
    visual_per_row: tuple[int, ...]  # visual placeholders of each row
    image_rows: tuple[int, ...]  # per image (batch order): its row
    image_tokens: tuple[ImageTokens, ...]  # per image: its tokens' layout (units, layout tokens) as the family gives it
    item_sizes: tuple[tuple[int, ...], ...] | None = None  # per image: its row of `image_sizes` (None: none given)
    supervised: int | None = None  # next-token targets the loss reads (None: no labels)
    positions: Tensor | None = None  # M-RoPE families: the prompts' position ids [3, B, L], computed on the host (pinned
                                     # where a GPU exists, so their copy does not wait for it); None: the device's cumsum

    @cached_property
    def text_width(self) -> int:
        """Slots of the text stream: the longest row's non-visual tokens, padding included (`Layout`)."""
        return self.length - min(self.visual_per_row, default=0)

    @cached_property
    def visual_width(self) -> int:
        return max(self.visual_per_row, default=0)

    def visual_counts(self, pre=None) -> "VisualCounts | None":
        """The visual tokens entering the LLM, after the plan's pre-LLM step `pre` (None: unknown, the knee;
        or a video's steps subsampled or pooled over time)."""
        videos = any(s is not None and len(s) == 3 and s[0] > 1 for s in self.item_sizes or ())
        if pre is not None and (pre.method == "cls_knee" or videos and (pre.method == "frames" or (pre.kernel_t or 1) > 1)):
            return None
        rows: list[list[tuple[int, ...]]] = [[] for _ in self.visual_per_row]
        extras = [0] * len(rows)
        for row, image in zip(self.image_rows, self.image_tokens):
            off = (image.off_grid,) if image.off_grid else ()
            if pre is not None and pre.method == "pool":  # a token per window of each unit's grid
                units = tuple(len({(r // pre.kernel, c // pre.kernel) for r, c in u}) for u in image.units) + off
            elif pre is not None and pre.method == "dominant":
                units = (image.pre_llm(pre, 0) - image.extra,)
            else:  # (frames leaves images as they are)
                units = tuple(len(u) for u in image.units) + off
            rows[row].append(units)
            extras[row] += image.extra
        return VisualCounts(tuple(tuple(r) for r in rows), tuple(extras), pre is None or pre.method != "dominant")

    @staticmethod
    def of(config, input_ids: Tensor, attention_mask: Tensor, n_images: int, image_sizes: Tensor | None = None,
           labels: Tensor | None = None, sample_index: Tensor | None = None, positions: Tensor | None = None) -> "BatchSizes":
        """The sizes of a batch from its tensors: on the host for free where they are CPU tensors (the
        collator's), or read back from a device once. Checks on the way what only these numbers show:
        every row holds whole images, and no supervised label follows an `<image>` token."""
        from .streams import visual_mask

        mask = attention_mask.bool()
        is_visual = visual_mask(input_ids, mask, config.visual_token_ids)
        per_row = is_visual.sum(1).tolist()
        sizes = [None] * n_images if image_sizes is None else [tuple(s) for s in image_sizes.tolist()]
        family = config.model_family
        tokens = [config.tokens_per_image(s) for s in sizes]
        rows = image_rows(per_row, tokens, config.image_token_id)
        supervised = None
        if labels is not None:
            targets = torch.full_like(labels, -100)
            targets[:, :-1] = labels[:, 1:]
            if sample_index is not None:  # a packed sample's last token predicts nothing of the next one
                targets[:, :-1] = targets[:, :-1].masked_fill(sample_index[:, 1:] != sample_index[:, :-1], -100)
            read = (targets != -100) & mask
            if bool((read & is_visual).any()):
                raise ValueError(
                    "a supervised label directly follows an <image> token; the prediction would come from a "
                    "visual token. Mask that label with -100 (LLaVA puts a newline after <image>)."
                )
            supervised = int(read.sum())
        layouts = tuple(_image_tokens(family, config, s) for s in sizes)
        if positions is not None and positions.device.type == "cpu" and torch.cuda.is_available():
            positions = positions.pin_memory()
        return BatchSizes(input_ids.shape[1], tuple(per_row), tuple(rows), layouts, None if image_sizes is None else tuple(sizes),
                          supervised, positions)


_LAYOUTS: dict[int, tuple[weakref.ref, dict]] = {}  # id(config) -> (the config, {size: its ImageTokens})


def _image_tokens(family, config, size) -> ImageTokens:
    """One image's token layout, cached per config and size (every batch asks)."""
    ref, layouts = _LAYOUTS.get(id(config), (None, None))
    if ref is None or ref() is not config:  # (a new config that took a freed one's id starts afresh)
        layouts = {}
        _LAYOUTS[id(config)] = (weakref.ref(config), layouts)
    if size not in layouts:
        layouts[size] = ImageTokens.from_places(family.image_places(config, size))
    return layouts[size]


def image_rows(tokens_per_row: list[int], tokens_per_image: list[int], image_token_id: int) -> list[int]:
    """The prompt row of each image: images fill the rows' placeholder tokens in order, so every row
    must hold whole images (a clear error otherwise, naming both counts)."""
    rows, row, filled = [], 0, 0
    for n in tokens_per_image:
        while row < len(tokens_per_row) and filled == tokens_per_row[row]:
            row, filled = row + 1, 0
        if row == len(tokens_per_row) or filled + n > tokens_per_row[row]:
            break
        rows.append(row)
        filled += n
    else:
        if sum(tokens_per_row) == sum(tokens_per_image):
            return rows
    raise ImageTokenMismatch(
        f"<image> tokens per row {tokens_per_row} do not match the {len(tokens_per_image)} image(s), which give "
        f"{tokens_per_image} visual tokens each: each image needs exactly its count of consecutive <image> tokens "
        f"(image_token_id={image_token_id}); tokenize prompts with data.chat.ChatTokenizer or the checkpoint's processor, "
        "which expand one <image> placeholder to that many"
    )


class VisualCounts(NamedTuple):
    """The visual tokens of a batch as the host follows them through a plan (see the module docstring)."""

    images: tuple[tuple[tuple[int, ...], ...], ...]  # [row][image]: selectable tokens per unit (one total once
                                                     # a budget per image mixed the units)
    extras: tuple[int, ...]  # per row: layout tokens
    per_unit: bool  # the counts are per unit (what budgets per unit and uniform lattices need)

    @property
    def width(self) -> int:
        """The most visual tokens a row holds (at least 1: what a compacted stream is wide)."""
        return max([1] + [sum(map(sum, row)) + extra for row, extra in zip(self.images, self.extras)])

    def _per_image(self, budget) -> "VisualCounts":
        return VisualCounts(tuple(tuple((budget(sum(units)),) for units in row) for row in self.images), self.extras, False)

    def selected(self, sel) -> "VisualCounts | None":
        """After a selection (None: the count is the data's, a threshold's; or per unit after a budget per image)."""
        if sel.keep is None or sel.per_unit and not self.per_unit:
            return None
        if sel.per_unit:
            return VisualCounts(tuple(tuple(tuple(sel.budget(u) for u in units) for units in row) for row in self.images),
                                self.extras, True)
        return self._per_image(sel.budget)

    def routed(self, route) -> int:
        """The width of a routed layer's tokens (`Route.budget` per image)."""
        return self._per_image(route.budget).width

    def dropped(self) -> "VisualCounts":
        return VisualCounts(tuple(() for _ in self.images), tuple(0 for _ in self.extras), True)
