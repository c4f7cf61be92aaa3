"""Sequence packing: the samples of one streaming buffer packed into rows of at most `max_length` tokens.

A padded batch computes every pad position; length grouping (data/length_groups.py) reduces the
padding but a mix of 60-token text turns and 2900-token image samples still pads. Packing puts
several whole samples one after another into each row (the model keeps them apart:
models/packed_attention.py), so a row is nearly full and every batch holds about the same tokens.

Per buffer of `buffer_samples` samples: first-fit decreasing (the longest sample first,
into the first row with room), then rows sorted by length are cut into batches of `batch_size` rows
and the batch order is shuffled with the buffer's seeded generator. Samples are never cut (so never
inside their visual span); one longer than `max_length` is refused, naming it. Packs never span
buffers, so a buffer's packs are a function of its samples and the seed alone, and the stream
position (raw count before the buffer plus the batches taken from it, data/stream_position.py)
resumes exactly. Each sample of a batch is tagged with its row (`PACK_ROW`) for the collator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from .length_groups import sample_length

PACK_ROW = "pack_row"  # sample key: the row of its batch the sample is packed into (data/batch.py)


class SampleTooLong(ValueError):
    """A sample does not fit in one packed row."""


@dataclass(frozen=True)
class Packing:
    batch_size: int  # packed rows per batch
    max_length: int  # tokens per row
    buffer_samples: int = 1024  # samples packed together (more: fuller rows, more samples to re-read on resume)
    length: Callable[[dict], int] = sample_length

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.buffer_samples < 1 or self.max_length < 1:
            raise ValueError(f"packing needs batch_size, buffer_samples (data.pack_buffer) and max_length >= 1, "
                             f"got {self.batch_size}, {self.buffer_samples} and {self.max_length}")

    @property
    def buffer_size(self) -> int:
        """Samples per buffer (data/pipeline.py reads this many, then asks for their batches)."""
        return self.buffer_samples

    def rows(self, samples: list[dict]) -> list[list[dict]]:
        """First-fit decreasing: every sample in the first row it fits, longest first (ties in stream order)."""
        rows: list[list[dict]] = []
        room: list[int] = []
        for sample in sorted(samples, key=self.length, reverse=True):
            n = self.length(sample)
            if n > self.max_length:
                raise SampleTooLong(f"sample {sample.get('key', '?')!r} has {n} tokens, more than a packed row holds "
                                    f"(data.max_length={self.max_length}); raise data.max_length or shorten the sample")
            at = next((i for i, r in enumerate(room) if r >= n), None)
            if at is None:
                rows.append([sample])
                room.append(self.max_length - n)
            else:
                rows[at].append(sample)
                room[at] -= n
        return rows

    def batches(self, samples: list[dict], rng: random.Random) -> list[list[dict]]:
        """`samples` packed, as batches of `batch_size` rows (the last may hold fewer), each sample
        tagged with its row; samples are listed row by row, as the collator lays them out."""
        rows = sorted(self.rows(samples), key=lambda r: sum(map(self.length, r)), reverse=True)
        batches = []
        for i in range(0, len(rows), self.batch_size):
            batch = []
            for k, row in enumerate(rows[i : i + self.batch_size]):
                for sample in row:
                    sample[PACK_ROW] = k
                    batch.append(sample)
            batches.append(batch)
        rng.shuffle(batches)
        return batches
