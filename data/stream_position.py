"""Where the training stream stopped, so a resumed run reads exactly the batches an uninterrupted one would.

A rank's loader has one reader per dataloader worker (one when `num_workers=0`); the loader takes whole
batches from the readers round-robin. Each sample carries `stream_pos = (reader, epoch, drawn)`: `drawn`
counts the raw shard samples (corrupt ones included) that reader took from its shuffled stream in that
epoch. The main process folds the positions of the batches it actually trained on (not the ones
prefetched) into a `StreamPosition`; a checkpoint holds one per rank. Resuming, each reader replays its
raw stream up to that count without decoding anything and the loader starts at the reader that was next.
With length-grouped batches (data/length_groups.py) a reader emits the batches of one buffer out of stream
order, so its position is the raw count before that buffer plus the batches already `taken` from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StreamPosition:
    """Per reader `(epoch, drawn)`, the reader whose batch the loader takes next, and per reader the
    batches already taken from the length-grouped buffer that follows `drawn` (all 0 without grouping)."""

    positions: tuple[tuple[int, int], ...]
    next_reader: int = 0
    taken: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.taken:
            object.__setattr__(self, "taken", (0,) * len(self.positions))

    @classmethod
    def start(cls, n_readers: int) -> "StreamPosition":
        return cls(((0, 0),) * n_readers, 0)

    @property
    def n_readers(self) -> int:
        return len(self.positions)

    def after(self, stream_pos: tuple[int, ...]) -> "StreamPosition":
        """The position once the batch whose last sample was at `stream_pos` — `(reader, epoch, drawn)`,
        or `(reader, epoch, drawn, taken)` for a length-grouped batch — has been consumed."""
        reader, epoch, drawn, *rest = (int(v) for v in stream_pos)
        positions, taken = list(self.positions), list(self.taken)
        positions[reader] = (epoch, drawn)
        taken[reader] = rest[0] if rest else 0
        return StreamPosition(tuple(positions), (reader + 1) % self.n_readers, tuple(taken))

    def to_tensor(self) -> torch.Tensor:
        """[n_readers + 1, 3] int64: the readers' (epoch, drawn, taken), then (next_reader, n_readers, 0)."""
        rows = [(*p, t) for p, t in zip(self.positions, self.taken)]
        return torch.tensor([*rows, (self.next_reader, self.n_readers, 0)], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "StreamPosition":
        """Also reads the [n_readers + 1, 2] tensors of checkpoints written before length grouping."""
        rows = [tuple(int(v) for v in row) + (0,) * (3 - len(row)) for row in t.tolist()]
        next_reader, n_readers, _ = rows[-1]
        if len(rows) != n_readers + 1:
            raise ValueError(f"malformed stream position: {n_readers} readers but {len(rows) - 1} rows")
        return cls(tuple(r[:2] for r in rows[:-1]), next_reader, tuple(r[2] for r in rows[:-1]))


def gather_ranks(trainer, t: torch.Tensor) -> torch.Tensor:
    """`t` from every rank stacked as [world, *t.shape] (checkpoints are written by rank 0 only)."""
    if trainer.world_size == 1:
        return t.unsqueeze(0)
    strategy = trainer.strategy
    return strategy.all_gather(t.to(strategy.root_device)).cpu()
