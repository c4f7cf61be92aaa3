"""Where the training stream stopped, so a resumed run reads exactly the batches an uninterrupted one would.

A rank's loader has one reader per dataloader worker (one when `num_workers=0`); the loader takes whole
batches from the readers round-robin. Each sample carries `stream_pos = (reader, epoch, drawn)`: `drawn`
counts the raw shard samples (corrupt ones included) that reader took from its shuffled stream in that
epoch. The main process folds the positions of the batches it actually trained on (not the ones
prefetched) into a `StreamPosition`; a checkpoint holds one per rank. Resuming, each reader replays its
raw stream up to that count without decoding anything and the loader starts at the reader that was next.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StreamPosition:
    """Per reader `(epoch, drawn)`, and the reader whose batch the loader takes next."""

    positions: tuple[tuple[int, int], ...]
    next_reader: int = 0

    @classmethod
    def start(cls, n_readers: int) -> "StreamPosition":
        return cls(((0, 0),) * n_readers, 0)

    @property
    def n_readers(self) -> int:
        return len(self.positions)

    def after(self, stream_pos: tuple[int, int, int]) -> "StreamPosition":
        """The position once the batch whose last sample was at `stream_pos` has been consumed."""
        reader, epoch, drawn = (int(v) for v in stream_pos)
        positions = list(self.positions)
        positions[reader] = (epoch, drawn)
        return StreamPosition(tuple(positions), (reader + 1) % self.n_readers)

    def to_tensor(self) -> torch.Tensor:
        """[n_readers + 1, 2] int64: the readers' (epoch, drawn), then (next_reader, n_readers)."""
        return torch.tensor([*self.positions, (self.next_reader, self.n_readers)], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "StreamPosition":
        rows = [tuple(int(v) for v in row) for row in t.tolist()]
        next_reader, n_readers = rows[-1]
        if len(rows) != n_readers + 1:
            raise ValueError(f"malformed stream position: {n_readers} readers but {len(rows) - 1} rows")
        return cls(tuple(rows[:-1]), next_reader)


def gather_ranks(trainer, t: torch.Tensor) -> torch.Tensor:
    """`t` from every rank stacked as [world, *t.shape] (checkpoints are written by rank 0 only)."""
    if trainer.world_size == 1:
        return t.unsqueeze(0)
    strategy = trainer.strategy
    return strategy.all_gather(t.to(strategy.root_device)).cpu()
