"""Accumulation windows: every training batch carries the supervised-token count of its optimizer step.

An optimizer step's loss is the sum of its token losses divided by the supervised tokens of all its
micro-batches on all ranks (train/module.py), so every token weighs the same whatever the length of
the micro-batch it came in. That count is needed before the step's first backward, so the training
loader reads each window of `accumulate_grad_batches` micro-batches ahead (torchtitan's way) and
tags its batches with the window's count on this rank; the module sums it over the ranks. Reading
ahead leaves the stream position alone: it advances when Lightning takes a batch
(MLLMDataModule.on_before_batch_transfer), so a checkpoint re-reads what was read but not trained on.
"""

from __future__ import annotations

from itertools import islice
from typing import Callable, Iterable, Iterator

import lightning as L
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import Tensor
from torch.utils.data import DataLoader

from .batch import Batch
from .chat import IGNORE


def supervised_tokens(labels: Tensor) -> int:
    """The tokens a batch's loss covers: labels are aligned with the inputs and position t learns to
    predict label t + 1 (models/mllm.py `_loss`), so a row's first label is never a target."""
    return int((labels[:, 1:] != IGNORE).sum())


def accumulation_windows(batches: Iterable[Batch], size: int, done: int = 0) -> Iterator[Batch]:
    """`batches` in windows of `size`, each batch tagged `window = (supervised tokens of its window,
    its index in the window, the window's length)`. The first window has `size - done` batches (`done`
    ran before a resume); the last is shorter when the batches end (Lightning steps at an epoch's end)."""
    it, n = iter(batches), size - done
    while window := list(islice(it, n)):
        tokens = sum(supervised_tokens(b.labels) for b in window)
        for i, batch in enumerate(window):
            batch.window = (tokens, i, len(window))
            yield batch
        n = size


def window_position(trainer: L.Trainer) -> int:
    """Micro-batches of the current accumulation window already run when the training loader starts:
    non-zero only after resuming from a checkpoint saved mid-window (on preemption). Lightning steps by
    its count of the epoch's batches, which the checkpoint restores; DeepSpeed's engine by its own
    micro-step count, which starts from 0 in every fit (DeepSpeed does not save it)."""
    size = trainer.accumulate_grad_batches
    if isinstance(trainer.strategy, DeepSpeedStrategy):
        return trainer.strategy.deepspeed_engine.micro_steps % size
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed % size


class WindowLoader(DataLoader):
    """A training DataLoader whose batches come tagged with their accumulation window
    (`accumulation_windows`); `window()` gives the window size and position when a pass starts."""

    def __init__(self, *args, window: Callable[[], tuple[int, int]], **kwargs):
        super().__init__(*args, **kwargs)
        self.window = window

    def __iter__(self):
        yield from accumulation_windows(super().__iter__(), *self.window())


def trainer_window(trainer: L.Trainer | None) -> Callable[[], tuple[int, int]]:
    """`WindowLoader.window` for a loader that `trainer` fits on (None: no trainer, windows of one)."""
    if trainer is None:
        return lambda: (1, 0)
    return lambda: (trainer.accumulate_grad_batches, window_position(trainer))
