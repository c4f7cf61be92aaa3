"""Slurm preemption that multi-rank jobs survive: the signal only sets a flag, the ranks act together.

Slurm sends SIGUSR1 some time before the time limit (`#SBATCH --signal=SIGUSR1@90`). Lightning's own
auto-requeue saves the checkpoint inside the signal handler, on each rank wherever that rank happens
to be; with several ranks one of them can be inside a gradient all-reduce while another starts the
checkpoint's collectives, and the job hangs until Slurm kills it, unrequeued. Here the handler only
sets a flag; at the end of every training batch the ranks all-reduce it (any rank signalled is
enough), and when it is set every rank saves `<run dir>/hpc_ckpt_<n>.ckpt` together, rank 0 runs
`scontrol requeue $SLURM_JOB_ID`, and every rank leaves fit by raising `Requeued` (a SystemExit,
like Lightning's own SIGTERM exit), so no final evaluation or export runs in the little time left.
The requeued job keeps its id, hence its run directory, and `ckpt_path: auto` (train/resume.py)
resumes from that checkpoint, the newest there.

`build_trainer` switches Lightning's handler off with `cluster_plugins()`.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)
WHEN = ("slurm", "always", "never")


class Requeued(SystemExit):
    """Raised on every rank after the preemption checkpoint is saved (and the job requeued)."""


def cluster_plugins() -> list:
    """Lightning's Slurm environment without its in-handler auto-requeue (RequeueOnSignal replaces it)."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def hpc_checkpoint_path(root: str | Path) -> Path:
    """The next `hpc_ckpt_<n>.ckpt` in `root` (Lightning's naming, which resuming looks for)."""
    numbers = [int(m.group(1)) for p in Path(root).glob("hpc_ckpt_*") if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))]
    return Path(root) / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def slurm_job_id() -> str | None:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class RequeueOnSignal(L.Callback):
    """On `signal` (SIGUSR1 by default): checkpoint on all ranks at the next batch end, requeue, stop.

    `when`: slurm (only inside a Slurm job), always (also outside Slurm: checkpoint and stop, nothing
    to requeue), never. The handler stays installed after fit, so a late signal cannot kill the
    final evaluation or export (the default action of SIGUSR1 is to terminate).
    """

    def __init__(self, signal: str = "SIGUSR1", when: str = "slurm"):
        if when not in WHEN:
            raise ValueError(f"callbacks.preemption.when must be one of {', '.join(WHEN)}, got {when!r}")
        self.signum = _signal_number(signal)
        self.when = when
        self.received = False

    @property
    def active(self) -> bool:
        return self.when == "always" or (self.when == "slurm" and SLURMEnvironment.detect())

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.active and threading.current_thread() is threading.main_thread():
            signal.signal(self.signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True  # nothing else here: the ranks act together at the next batch end

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.active or not trainer.strategy.reduce_boolean_decision(self.received, all=False):
            return
        path = trainer.strategy.broadcast(hpc_checkpoint_path(trainer.default_root_dir))  # one name on all ranks
        trainer.save_checkpoint(path)  # every rank, ends in a barrier (sharded strategies write their shards)
        job = slurm_job_id()
        if trainer.is_global_zero:
            log.warning("%s at step %d: saved %s%s", signal.Signals(self.signum).name, trainer.global_step, path,
                        "" if job else "; stopping (resume: the same run directory with ckpt_path=auto)")
            if job:
                requeue(job)
        raise Requeued(0)


def requeue(job: str) -> None:
    """`scontrol requeue <job>`: Slurm stops this job and queues it again under the same id."""
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.error("could not requeue Slurm job %s (%s); resubmit it, it resumes from the checkpoint", job, err)
        return
    if proc.returncode:
        log.error("`scontrol requeue %s` failed: %s; resubmit the job (the checkpoint is saved, it resumes from it) "
                  "and check that the partition allows requeueing (#SBATCH --requeue, JobRequeue)", job,
                  proc.stderr.strip())
    else:
        log.warning("requeued Slurm job %s; it resumes from the checkpoint", job)


def _signal_number(name: str) -> int:
    try:
        return int(getattr(signal.Signals, name if name.startswith("SIG") else f"SIG{name}"))
    except AttributeError:
        raise ValueError(f"callbacks.preemption.signal: unknown signal {name!r} (e.g. SIGUSR1, SIGUSR2, SIGTERM)") from None
