"""Length-grouped batches within a streaming buffer (LLaVA's `group_by_modality_length`).

LLaVA's trainer (llava/train/llava_trainer.py, `get_modality_length_grouped_indices`) sorts samples
by length inside shuffled mega-batches, with image and text-only samples in separate batches, so a
batch pads little. A shard stream has no global index to sort, so the same is done per buffer of
`buffer_batches * batch_size` samples: split by modality, sort each part by length, cut it into
batches, put the leftovers of both parts together (they make exactly one batch when the buffer is
full) and shuffle the batch order with a seeded generator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable


def sample_length(sample: dict) -> int:
    """Tokens the LLM sees (image placeholders are already expanded in `input_ids`)."""
    return len(sample["input_ids"])


def has_image(sample: dict) -> bool:
    return sample.get("pixel_values") is not None


@dataclass(frozen=True)
class LengthGrouping:
    batch_size: int
    buffer_batches: int = 32
    length: Callable[[dict], int] = sample_length
    modality: Callable[[dict], bool] = has_image

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.buffer_batches < 1:
            raise ValueError(
                f"length grouping needs batch_size >= 1 and buffer_batches >= 1 (data.group_buffer_batches), "
                f"got {self.batch_size} and {self.buffer_batches}"
            )

    @property
    def buffer_size(self) -> int:
        return self.batch_size * self.buffer_batches

    def batches(self, samples: list[dict], rng: random.Random) -> list[list[dict]]:
        """`samples` as batches of similar length, one modality per batch (but the leftovers')."""
        groups: list[list[dict]] = []
        leftovers: list[dict] = []
        for modality in (True, False):
            part = sorted((s for s in samples if self.modality(s) == modality), key=self.length, reverse=True)
            full = len(part) - len(part) % self.batch_size
            groups += [part[i : i + self.batch_size] for i in range(0, full, self.batch_size)]
            leftovers += part[full:]
        leftovers.sort(key=self.length, reverse=True)
        groups += [leftovers[i : i + self.batch_size] for i in range(0, len(leftovers), self.batch_size)]
        rng.shuffle(groups)
        return groups


def padding_fraction(batches: list[list[int]]) -> float:
    """Padded tokens / all tokens when each batch (a list of lengths) is padded to its longest."""
    total = sum(len(b) * max(b) for b in batches if b)
    return 1.0 - sum(sum(b) for b in batches) / total if total else 0.0
