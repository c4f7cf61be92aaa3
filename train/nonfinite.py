"""Skip training steps whose loss is NaN/Inf, and stop a run that keeps producing them.

One bad batch (a corrupt image, an all-masked sample, a rare overflow) should not poison the
weights; a run whose loss stays non-finite is broken and should stop while its last good state can
still be saved. Every rank must take the same branch: a rank that skips backward while another
runs it leaves the gradient all-reduce waiting forever, so the decision is reduced over ranks
("skip if any rank's loss is non-finite").

How a step is skipped: Lightning refuses `training_step` returning None when world_size > 1, and
DeepSpeed refuses it everywhere, so backward always runs, on a NaN loss (gradients NaN on every
rank, so every rank joins the gradient all-reduce as usual). Then nothing is applied: the guard
drops the gradients in `on_before_optimizer_step` (torch optimizers skip parameters without a
gradient, so weights and Adam moments stay as they were), fp16's GradScaler skips a step with
non-finite gradients anyway, and DeepSpeed's ZeRO optimizer drops an update whose gradient norm is
non-finite (its overflow check: on for fp32, and for bf16 with `bf16.check_grad_overflow`, the
default). With gradient accumulation one bad micro-batch drops the whole accumulated update.
global_step and the step-based lr schedule still advance over skipped steps.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from models.config import ConfigError


class NonFiniteLossError(RuntimeError):
    """The training loss was NaN/Inf for too many steps in a row."""


class NonFiniteGuard:
    """Called from `training_step` (`check`) and `on_before_optimizer_step` (`drop_gradients`).

    `max_in_row` consecutive non-finite steps stop the run: every rank saves a checkpoint of the
    (unchanged, last good) state and raises `NonFiniteLossError`. 0 disables stopping.
    """

    def __init__(self, max_in_row: int = 10):
        if isinstance(max_in_row, bool) or not isinstance(max_in_row, int) or max_in_row < 0:
            raise ConfigError(f"nonfinite.max_in_row must be an integer >= 0 (0: never stop), got {max_in_row!r}")
        self.max_in_row = max_in_row
        self.total = 0  # non-finite steps in this process's fit (logged as train/nonfinite_steps)
        self.in_row = 0
        self.skip_update = False  # a non-finite (micro-)batch since the last optimizer step

    def check(self, module: L.LightningModule, loss: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The loss to run backward on: `loss`, or NaN when any rank's loss is non-finite."""
        trainer = module.trainer
        bad = trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss.detach()).all()), all=False)
        if bad:
            self.total += 1
            self.in_row += 1
        else:
            self.in_row = 0
        module.log("train/nonfinite_steps", float(self.total), batch_size=batch_size)
        if not bad:
            return loss
        if self.max_in_row and self.in_row >= self.max_in_row:
            self._stop(trainer)
        self.skip_update = True
        return loss * float("nan")

    def drop_gradients(self, module: L.LightningModule) -> None:
        """From `on_before_optimizer_step`: after a non-finite (micro-)batch the update has no gradients."""
        if self.skip_update:
            for p in module.parameters():
                p.grad = None
        self.skip_update = False

    def _stop(self, trainer: L.Trainer) -> None:
        ckpt_dir = getattr(trainer.checkpoint_callback, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        path = Path(ckpt_dir) / f"nonfinite-step{trainer.global_step:06d}.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # every rank (DeepSpeed writes its shards collectively)
        raise NonFiniteLossError(
            f"training loss was NaN/Inf for {self.in_row} steps in a row at step {trainer.global_step} "
            f"({self.total} non-finite steps in total); stopping. Skipped steps applied no update, so the "
            f"last good weights are saved in {path}. Check the learning rate (optim.lr, warmup), the precision "
            f"(trainer.precision: fp16 overflows, prefer bf16-mixed or 32-true), gradient clipping, and the data "
            f"(corrupt images, samples whose labels are all masked). Raise nonfinite.max_in_row to tolerate "
            f"longer streaks, or resume from that checkpoint with ckpt_path=<it> after the fix."
        )
