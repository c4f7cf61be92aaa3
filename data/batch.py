"""The training/evaluation batch as one typed object, and the collator that builds it.

Every consumer (the LightningModule, the efficiency callbacks, the analysis tools) reads the same
named fields. Lightning moves the tensors to the device field by field (dataclasses are collections
to it); the lists of strings stay on the host.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .chat import IGNORE, pad
from .packing import PACK_ROW


@dataclass
class Batch:
    input_ids: Tensor  # [B, L] right-padded prompt + answer (training and the loss)
    attention_mask: Tensor  # [B, L]
    labels: Tensor  # [B, L], IGNORE outside assistant replies
    prompt_ids: Tensor  # [B, P] left-padded: everything before the evaluated reply (generation; data/validity.py)
    prompt_mask: Tensor  # [B, P]
    pixel_values: Tensor | None  # images of all rows in row order: [N, 3, H, W], or [N, tiles, 3, H, W] for tiling
                                 # families (LLaVA-NeXT; zero tiles pad); None for text-only batches
    answers: list[str]  # the evaluated reply of each row (exact-match target)
    skills: list[str]  # what each row tests ("all" when the data has no skills)
    keys: list[str]  # shard sample keys (for messages about bad samples)
    scored: list[bool]  # False: a padding row that evens out the ranks' evaluation shares
    n_skipped: int = 0  # corrupt samples skipped while this batch was read
    skipped: dict[str, int] = field(default_factory=dict)  # the same by reason (data/validity.py REASONS)
    stream_pos: tuple[int, ...] | None = None  # training-stream position of the last row (resume)
    n_tokens: int = 0  # rows x longest row: what the model processes, padding included
    n_padding: int = 0  # of those, padding
    image_sizes: Tensor | None = None  # [N, 2] each image's original (height, width): a tiling family's layout
                                       # (Qwen: [N, 3], each image's patch grid, transformers' image_grid_thw)
    window: tuple[int, int, int] | None = None  # training: (supervised tokens, index, length) of the batch's
                                                # accumulation window on this rank (data/windows.py)
    sample_index: Tensor | None = None  # packed rows (data/packing.py): [B, L] the sample of its row each token
                                        # belongs to; answers, skills, keys, prompts are then per sample
    step_seconds: Tensor | None = None  # [N] float: the seconds one temporal step of each image / video spans
                                        # (0 for an image; models/video.py); None when the batch holds no video
    sizes: object = None  # the training rows' sizes as the host knows them (models.host_sizes.BatchSizes), set by the
                          # module while the batch is still on the host (train/module.py), so no forward reads them back
    prompt_sizes: object = None  # the same of the generation prompts

    @property
    def n_samples(self) -> int:
        return len(self.keys)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def images(self) -> dict[str, Tensor | None]:
        """The model's image (and video) inputs (`model(ids, mask, **batch.images)`)."""
        return {"pixel_values": self.pixel_values, "image_sizes": self.image_sizes, "step_seconds": self.step_seconds}

    def blank_images(self) -> "Batch":
        """The same batch with every image replaced by zeros (the normalised mean image)."""
        return replace(self, pixel_values=None if self.pixel_values is None else torch.zeros_like(self.pixel_values))  # sizes stay


class Collator:
    """Right-padded training inputs plus left-padded generation prompts (everything before the evaluated reply)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples: list[dict]) -> Batch:
        if samples and PACK_ROW in samples[0]:
            return self.packed(samples)
        ids = [s["input_ids"] for s in samples]
        prompts = [s["input_ids"][: s["prompt_len"]] for s in samples]
        pixel_values, image_sizes = collate_images(samples)
        pos = samples[-1].get("stream_pos")  # one worker made the whole batch; its last sample
        lengths = [len(i) for i in ids]
        return Batch(
            input_ids=pad(ids, self.pad_id),
            attention_mask=pad([[1] * len(s) for s in ids], 0),
            labels=pad([[IGNORE] * len(s["labels"]) if s.get("padding") else s["labels"] for s in samples], IGNORE),
            prompt_ids=pad(prompts, self.pad_id, left=True),
            prompt_mask=pad([[1] * len(p) for p in prompts], 0, left=True),
            pixel_values=pixel_values,
            answers=[s["answer"] for s in samples],
            skills=[s["skill"] for s in samples],
            keys=[s["key"] for s in samples],
            scored=[not s.get("padding", False) for s in samples],  # False: an EvenEvalStream pad
            n_skipped=sum(s.get("n_skipped", 0) for s in samples),
            skipped=dict(sum((Counter(s.get("skipped") or {}) for s in samples), Counter())),
            stream_pos=tuple(int(v) for v in pos) if pos is not None else None,
            n_tokens=len(ids) * max(lengths),
            n_padding=len(ids) * max(lengths) - sum(lengths),
            image_sizes=image_sizes,
            step_seconds=collate_step_seconds(samples),
        )


    def packed(self, samples: list[dict]) -> Batch:
        """Rows of packed samples (data/packing.py; `samples` listed row by row), right-padded. A
        sample's first label is IGNORE, so no token learns to predict across a boundary."""
        rows: dict[int, list[dict]] = {}
        for s in samples:
            rows.setdefault(s[PACK_ROW], []).append(s)
        packs = [rows[k] for k in sorted(rows)]
        if [s for p in packs for s in p] != samples:
            raise ValueError("packed samples must be listed row by row (data.packing.Packing.batches lays them out so)")
        ids = [[t for s in p for t in s["input_ids"]] for p in packs]
        labels = [[t for s in p for t in [IGNORE, *s["labels"][1:]]] for p in packs]
        sample_index = [[k for k, s in enumerate(p) for _ in s["input_ids"]] for p in packs]
        batch = self([{k: v for k, v in s.items() if k != PACK_ROW} for s in samples])  # the per-sample fields
        lengths = [len(i) for i in ids]
        return replace(
            batch,
            input_ids=pad(ids, self.pad_id),
            attention_mask=pad([[1] * n for n in lengths], 0),
            labels=pad(labels, IGNORE),
            sample_index=torch.tensor([r + [r[-1]] * (max(lengths) - len(r)) for r in sample_index]),  # pads: the last sample's
            n_tokens=len(ids) * max(lengths),
            n_padding=len(ids) * max(lengths) - sum(lengths),
        )


def collate_step_seconds(samples: list[dict]) -> Tensor | None:
    """Every image's and video's seconds per temporal step in row order, when some sample holds a video."""
    seconds = [float(v) for s in samples if s["pixel_values"] is not None for v in s.get("step_seconds") or []]
    return torch.tensor(seconds, dtype=torch.float32) if any(seconds) else None


def collate_images(samples: list[dict]) -> tuple[Tensor | None, Tensor | None]:
    """Every row's images in row order, and their sizes (when every sample gives them).

    A sample's `pixel_values` is a tensor [n, 3, H, W] (or one image [3, H, W]) or a list with one
    tensor per image: [3, H, W], or [tiles, 3, H, W] for a tiling family, whose images are padded
    with zero tiles to the batch's most (transformers' LlavaNext layout), or [patches, patch pixels]
    for Qwen, whose images are concatenated (transformers' Qwen2-VL layout; the sizes are then
    each image's patch grid (t, h, w), i.e. `image_grid_thw`)."""
    images, sizes = [], []
    for s in samples:
        pv = s["pixel_values"]
        if pv is None:
            continue
        images += list(pv) if isinstance(pv, (list, tuple)) else list(pv.unsqueeze(0) if pv.dim() == 3 else pv)
        sizes += list(s.get("image_sizes") or [])
    if not images:
        return None, None
    sizes_t = torch.tensor(sizes, dtype=torch.long) if len(sizes) == len(images) else None
    if images[0].dim() == 3:
        return torch.stack(images), sizes_t
    if images[0].dim() == 2:
        return torch.cat(images), sizes_t
    tiles = max(len(im) for im in images)
    out = images[0].new_zeros(len(images), tiles, *images[0].shape[1:])
    for i, im in enumerate(images):
        out[i, : len(im)] = im
    return out, sizes_t
