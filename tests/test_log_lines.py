"""What a run prints and writes is true: exports follow the umask and their log names the final
directory; checkpoint saves do not log "weights_only was not set"; metrics that are already gathered
across ranks raise no "use sync_dist=True" warnings."""

from __future__ import annotations

import logging
import os
import socket
import stat
import warnings

import lightning as L
import pytest
import torch

from tests.helpers import tiny_model
from tests.tiny_fit import SeededModule, loader, make_batches, make_module
from train.callbacks import EfficiencyMetrics
from train.infra.resume import PeriodicCheckpoint


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_export_permissions_follow_the_umask(tmp_path, umask, dir_mode, file_mode):
    previous = os.umask(umask)
    try:
        export = tiny_model().save_pretrained(tmp_path / "export")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(export.stat().st_mode) == dir_mode
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in export.iterdir()} == {
        "config.json": file_mode, "model.safetensors": file_mode}


def test_the_export_log_names_the_final_directory(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        export = tiny_model().save_pretrained(tmp_path / "export")
    assert f"model weights saved to {export}" in caplog.text
    assert ".partial" not in caplog.text  # huggingface_hub's message names the temporary directory


@pytest.fixture
def lightning_logs(caplog):
    """Lightning's own logger does not propagate to the root logger that caplog listens on."""
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        yield caplog
    logger.removeHandler(caplog.handler)


def test_checkpoint_saves_do_not_log_weights_only_was_not_set(tmp_path, lightning_logs):
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        callbacks=[PeriodicCheckpoint(str(tmp_path / "checkpoints"), every_n_train_steps=1)])
    trainer.fit(make_module(), loader(make_batches(2)))
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert "weights_only" not in lightning_logs.text


class ScoredWithoutGenerating(SeededModule):
    """The module's evaluation bookkeeping (loss, accuracy tracker) without generation (no tokenizer)."""

    def validation_step(self, batch, batch_idx):
        out = self.model(batch.input_ids, batch.attention_mask, batch.pixel_values, labels=batch.labels)
        self._val_loss[0] += float(out.loss) * out.n_loss_tokens
        self._val_loss[1] += out.n_loss_tokens
        self.tracker.add(batch.skills, batch.answers, ["yes"] * batch.size, None, scored=batch.scored)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gathered_metrics_raise_no_sync_dist_warnings(monkeypatch, restore_environ):
    """A one-process DDP run: distributed as far as Lightning's logging is concerned."""
    from lightning.pytorch.strategies import DDPStrategy

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    module = make_module()
    module.__class__ = ScoredWithoutGenerating
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=DDPStrategy(process_group_backend="gloo"), logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[EfficiencyMetrics()])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            metrics = trainer.validate(module, loader(make_batches(2)), verbose=False)[0]
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert "val/acc" in metrics and "eff/prefill_ms" in metrics and "eff/flops_ratio" in metrics
    assert metrics["val/n_samples"] == 4 and metrics["eff/flops_ratio"] == 1.0  # synced values are unchanged
    assert [str(w.message) for w in caught if "sync_dist" in str(w.message)] == []
