"""The preemption signal only sets a flag; at the next batch end the run saves an hpc checkpoint and
leaves fit, and a new fit resumes from it. (With Slurm and 2 ranks: tests/test_slurm.py.)"""

import os
import signal

import lightning as L
import pytest
import torch

from tests.tiny_fit import WeightLog, loader, make_batches, make_module
from train.infra.preemption import RequeueOnSignal, Requeued, cluster_plugins, hpc_checkpoint_path


@pytest.fixture(autouse=True)
def keep_sigusr1_handler():
    previous = signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGUSR1, previous)


@pytest.fixture
def no_slurm(monkeypatch):
    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)


class SignalAt(L.Callback):
    """Stands in for Slurm: sends SIGUSR1 to this process at the end of batch `at`."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)


def trainer(tmp_path, *callbacks, max_steps=6):
    return L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, default_root_dir=tmp_path,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, callbacks=list(callbacks))


def test_signal_checkpoints_at_the_next_batch_end_and_the_run_resumes_from_it(tmp_path, no_slurm):
    log = WeightLog()
    module = make_module()
    with pytest.raises(Requeued):
        trainer(tmp_path, log, SignalAt(2), RequeueOnSignal(when="always")).fit(module, loader(make_batches(6)))
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
    with pytest.raises(ValueError, match="callbacks.preemption.when must be one of slurm, always, never"):
        RequeueOnSignal(when="sometimes")
    with pytest.raises(ValueError, match="callbacks.preemption.signal: unknown signal 'SIGFOO'"):
        RequeueOnSignal(signal="SIGFOO")
