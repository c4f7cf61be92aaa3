"""Preemption and termination that multi-rank jobs survive: a signal only sets a flag, the ranks act together.

Slurm sends SIGUSR1 some time before the time limit (`#SBATCH --signal=SIGUSR1@90`); `scancel`, a time
limit without `--signal`, Kubernetes and most other schedulers send SIGTERM. Lightning's own handlers
act inside the signal handler (its Slurm auto-requeue saves the checkpoint there, its SIGTERM handler
broadcasts a tensor there) on each rank wherever that rank happens to be; with several ranks one of
them can be inside a gradient all-reduce while another starts other collectives, and the job hangs.
Here the handler only sets a flag; at the end of every training batch the ranks all-reduce it (any
rank signalled is enough), and when it is set every rank saves `<run dir>/hpc_ckpt_<n>.ckpt`
together. Then, for SIGUSR1 inside Slurm, rank 0 runs `scontrol requeue $SLURM_JOB_ID` (the requeued
job keeps its id, hence its run directory, and `ckpt_path: auto` resumes from that checkpoint); for
SIGTERM nothing is requeued (`scancel` means stop). Either way training stops after that step the way
Lightning stops on SIGTERM (the step's logged metrics reach the loggers, which are flushed), no final
evaluation or export runs in the little time left, and the job exits 0 once requeued, else
128 + the signal number (143 for SIGTERM, 138 for SIGUSR1 outside Slurm), so wrappers and Slurm see
an interrupted job (`exit_code_after_signal`, train/run.py).

`build_trainer` switches Lightning's Slurm handler off with `cluster_plugins()`; this callback
replaces Lightning's SIGTERM handler when training starts.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from models.config import ConfigError

log = logging.getLogger(__name__)
WHEN = ("slurm", "always", "never")


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
    On `stop_signal` (SIGTERM by default; null: Lightning's own handling): the same without the requeue.

    `when` (for `signal`): slurm (only inside a Slurm job), always (also outside Slurm: checkpoint and
    stop, nothing to requeue), never. `stop_signal` is handled anywhere. The handlers stay installed after
    fit, so a late signal cannot kill the final evaluation or export (it is ignored there).
    """

    def __init__(self, signal: str = "SIGUSR1", when: str = "slurm", stop_signal: str | None = "SIGTERM"):
        if when not in WHEN:
            raise ConfigError(f"callbacks.preemption.when must be one of {', '.join(WHEN)}, got {when!r}")
        self.signum = _signal_number(signal, "signal")
        self.stop_signum = _signal_number(stop_signal, "stop_signal") if stop_signal else None
        self.when = when
        self.received: int | None = None  # the signal received (a stop signal wins)
        self.exit_code: int | None = None  # set when training stopped on a signal

    @property
    def active(self) -> bool:
        return self.when == "always" or (self.when == "slurm" and SLURMEnvironment.detect())

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if self.active:
            signal.signal(self.signum, self._handle)
        if self.stop_signum is not None:
            signal.signal(self.stop_signum, self._handle)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()  # Lightning installed its own SIGTERM handler after `setup`: ours replaces it

    def _handle(self, signum, frame) -> None:
        if self.received != self.stop_signum:
            self.received = signum  # nothing else here: the ranks act together at the next batch end

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        strategy = trainer.strategy
        if not strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        stop = strategy.reduce_boolean_decision(self.received == self.stop_signum, all=False)
        signum = self.stop_signum if stop else self.signum
        path = strategy.broadcast(hpc_checkpoint_path(trainer.default_root_dir))  # one name on all ranks
        trainer.save_checkpoint(path, weights_only=False)  # every rank, ends in a barrier (sharded strategies write shards)
        job = None if stop else slurm_job_id()
        requeued = False
        if trainer.is_global_zero:
            log.warning("%s at step %d: saved %s%s", signal.Signals(signum).name, trainer.global_step, path,
                        "" if job else "; stopping (resume: the same run directory with ckpt_path=auto)")
            requeued = bool(job) and requeue(job)
        requeued = strategy.broadcast(requeued)
        self.exit_code = 0 if requeued else 128 + signum
        # Lightning's "stop after this step": the step's metrics are logged, the loggers flushed, and
        # every rank (each sets it here, at the same step) leaves fit with SIGTERMException
        trainer._signal_connector.received_sigterm = True


def exit_code_after_signal(trainer: L.Trainer) -> int:
    """The exit code of a job whose training a signal stopped: 0 when requeued, else 128 + signal."""
    codes = [cb.exit_code for cb in trainer.callbacks if isinstance(cb, RequeueOnSignal) and cb.exit_code is not None]
    return codes[0] if codes else 128 + signal.SIGTERM  # Lightning's own SIGTERM handling (no callback, or evaluating)


@contextmanager
def exit_when_stopped_by_signal(trainer: L.Trainer):
    """Lightning leaves fit / validate on SIGTERM with a SystemExit whose code is 0; exit with
    `exit_code_after_signal` instead."""
    try:
        yield
    except SIGTERMException:
        raise SystemExit(exit_code_after_signal(trainer)) from None


def requeue(job: str) -> bool:
    """`scontrol requeue <job>`: Slurm stops this job and queues it again under the same id."""
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.error("could not requeue Slurm job %s (%s); resubmit it, it resumes from the checkpoint", job, err)
        return False
    if proc.returncode:
        log.error("`scontrol requeue %s` failed: %s; resubmit the job (the checkpoint is saved, it resumes from it) "
                  "and check that the partition allows requeueing (#SBATCH --requeue, JobRequeue)", job,
                  proc.stderr.strip())
        return False
    log.warning("requeued Slurm job %s; it resumes from the checkpoint", job)
    return True


def _signal_number(name: str, key: str) -> int:
    try:
        return int(getattr(signal.Signals, name if name.startswith("SIG") else f"SIG{name}"))
    except AttributeError:
        raise ConfigError(f"callbacks.preemption.{key}: unknown signal {name!r} (e.g. SIGUSR1, SIGUSR2, SIGTERM)") from None
