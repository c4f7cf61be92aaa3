"""The preemption and termination signals only set a flag; at the next batch end the run saves an hpc
checkpoint and leaves fit, and a new fit resumes from it. SIGTERM (scancel, Kubernetes) does the same and
the job exits 143 with its metrics flushed (a real `python -m train` killed with `kill -TERM`). (With
Slurm and 2 ranks: tests/test_slurm.py.)"""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from models.config import ConfigError
from tests.tiny_fit import WeightLog, loader, make_batches, make_module
from train.infra.preemption import RequeueOnSignal, cluster_plugins, exit_code_after_signal, hpc_checkpoint_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    previous = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


@pytest.fixture
def no_slurm(monkeypatch):
    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)


class SignalAt(L.Callback):
    """Stands in for Slurm: sends `signum` to this process at the end of batch `at`."""

    def __init__(self, at: int, signum: int = signal.SIGUSR1):
        self.at, self.signum = at, signum

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.at:
            os.kill(os.getpid(), self.signum)


def trainer(tmp_path, *callbacks, max_steps=6):
    return L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, default_root_dir=tmp_path,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, callbacks=list(callbacks))


@pytest.mark.parametrize("signum,exit_code", [(signal.SIGUSR1, 138), (signal.SIGTERM, 143)])
def test_signal_checkpoints_at_the_next_batch_end_and_the_run_resumes_from_it(tmp_path, no_slurm, signum, exit_code):
    log = WeightLog()
    module = make_module()
    stopped = trainer(tmp_path, log, SignalAt(2, signum), RequeueOnSignal(when="always"))
    with pytest.raises(SIGTERMException):  # how Lightning leaves fit after a step (train/run.py maps the exit code)
        stopped.fit(module, loader(make_batches(6)))
    assert exit_code_after_signal(stopped) == exit_code  # 128 + signal: interrupted (outside Slurm nothing is requeued)
    assert len(log.weights) == 3  # batches 0-2 ran; nothing after the signalled one
    ckpt = tmp_path / "hpc_ckpt_1.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 3
    saved = torch.cat([state["state_dict"][f"model.{n}"].flatten() for n, _ in module.model.named_parameters()])
    assert torch.equal(saved, log.weights[2])

    resumed = trainer(tmp_path, RequeueOnSignal(when="always"))
    resumed.fit(make_module(), loader(make_batches(6)), ckpt_path=str(ckpt))
    assert resumed.global_step == 6


def test_outside_slurm_the_default_installs_no_handler(no_slurm):
    before = signal.getsignal(signal.SIGUSR1)
    callback = RequeueOnSignal()  # when=slurm
    assert not callback.active and cluster_plugins() == []
    callback.setup(None, None, "fit")
    assert signal.getsignal(signal.SIGUSR1) is before


def test_hpc_checkpoints_are_numbered_after_the_newest(tmp_path):
    assert hpc_checkpoint_path(tmp_path).name == "hpc_ckpt_1.ckpt"
    (tmp_path / "hpc_ckpt_1.ckpt").touch()
    (tmp_path / "hpc_ckpt_3.ckpt").mkdir()  # DeepSpeed checkpoints are directories
    assert hpc_checkpoint_path(tmp_path).name == "hpc_ckpt_4.ckpt"


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match="callbacks.preemption.when must be one of slurm, always, never"):
        RequeueOnSignal(when="sometimes")
    with pytest.raises(ConfigError, match="callbacks.preemption.signal: unknown signal 'SIGFOO'"):
        RequeueOnSignal(signal="SIGFOO")
    with pytest.raises(ConfigError, match="callbacks.preemption.stop_signal: unknown signal 'TERMINATE'"):
        RequeueOnSignal(stop_signal="TERMINATE")


# --- the real thing: `kill -TERM` on a training job ------------------------------------------------------
TINY = [
    "run_name=sigterm", "trainer.accelerator=cpu", "trainer.max_steps=2000", "trainer.val_check_interval=2000",
    "trainer.log_every_n_steps=1", "callbacks.last.every_n_train_steps=1000", "data.source.n_train=32",
    "data.source.n_val=8", "data.batch_size=2", "data.num_workers=0", "model.config.text.num_hidden_layers=1",
    "model.config.vision.num_hidden_layers=2", "export=false", "eval.noimage=false",
    "+logger.csv.flush_logs_every_n_steps=1000",
]


def logged_steps(metrics_csv: Path) -> list[int]:
    with open(metrics_csv) as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_flushes_the_metrics_and_exits_143(tmp_path):
    run, log_file = tmp_path / "run", tmp_path / "log.txt"
    cmd = [sys.executable, "-m", "train", f"paths.root_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}",
           f"hydra.run.dir={run}", *TINY]
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=log)
        try:
            end = time.monotonic() + 120
            while "train/loss=" not in log_file.read_text():  # the progress bar shows losses: training runs
                assert proc.poll() is None and time.monotonic() < end, log_file.read_text()[-3000:]
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    out = log_file.read_text()
    assert proc.returncode == 143, out[-3000:]
    ckpt = torch.load(run / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    step = ckpt["global_step"]
    assert f"SIGTERM at step {step}: saved {run / 'hpc_ckpt_1.ckpt'}" in out
    assert 0 < step < 2000 and not (run / "metrics.json").exists()  # interrupted, not finished
    # the CSV logger flushes only every 1000 steps: every row here was written when the signal stopped the run
    assert logged_steps(run / "csv" / "metrics.csv") == list(range(step))  # every step's loss, the last one included
