"""NaN/Inf training losses (here: batches with NaN images) skip the step without touching the weights,
are counted, and stop the run after `max_in_row` in a row with a checkpoint of the last good weights.
The 2-rank runs poison only one rank's batch: both ranks must skip (or DDP/DeepSpeed would hang)."""

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.tiny_fit import WeightLog, loader, make_batches, make_module
from train.nonfinite import NonFiniteGuard, NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]


def fit(tmp_path, n_steps: int, poison: set[int], module=None, log=None):
    module, log = module or make_module(), log or WeightLog()
    trainer = L.Trainer(accelerator="cpu", max_steps=n_steps, logger=False, default_root_dir=tmp_path,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[log], limit_val_batches=0, gradient_clip_val=1.0)
    trainer.fit(module, train_dataloaders=loader(make_batches(n_steps, poison)))
    return module, trainer, log.weights


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    module, trainer, weights = fit(tmp_path, 6, poison={2, 4})
    assert torch.equal(weights[2], weights[1]) and torch.equal(weights[4], weights[3])  # skipped: no update
    for good in (1, 3, 5):
        assert not torch.equal(weights[good], weights[good - 1])  # real steps do update
    assert all(torch.isfinite(w).all() for w in weights)
    assert module.nonfinite.total == 2 and module.nonfinite.in_row == 0
    assert trainer.callback_metrics["train/nonfinite_steps"] == 2
    assert trainer.global_step == 6  # skipped batches still count as steps (the lr schedule is step-based)


def test_a_streak_of_nonfinite_steps_stops_with_the_last_good_weights_saved(tmp_path):
    module, log = make_module(max_in_row=3), WeightLog()
    with pytest.raises(NonFiniteLossError) as err:
        fit(tmp_path, 8, poison={1, 3, 4, 5}, module=module, log=log)  # the isolated step 1 is tolerated
    message = str(err.value)
    assert "3 steps in a row at step 5" in message and "4 non-finite steps in total" in message
    assert "optim.lr" in message and "trainer.precision" in message and "data" in message
    assert len(log.weights) == 5  # batches 0-4 finished, the run stopped in batch 5
    (ckpt,) = (tmp_path / "checkpoints").glob("nonfinite-step*.ckpt")
    assert ckpt.name == "nonfinite-step000005.ckpt" and str(ckpt) in message
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    saved = torch.cat([state[f"model.{name}"].flatten() for name, _ in module.model.named_parameters()])
    assert torch.isfinite(saved).all()
    assert torch.equal(saved, log.weights[2])  # the weights after the last good step (2)
    assert not torch.equal(saved, log.weights[1])


def test_max_in_row_must_not_be_negative():
    with pytest.raises(ValueError, match="nonfinite.max_in_row must be an integer >= 0"):
        NonFiniteGuard(max_in_row=-1)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero2"])
def test_two_ranks_skip_together_when_one_rank_is_nonfinite(tmp_path, strategy):
    cmd = [sys.executable, str(ROOT / "tests" / "tiny_fit.py"), strategy, str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["steps"] == 4 and rank["total"] == 1
        assert rank["unchanged"] == [False, True, False]  # the step at index 2 applied no update
    assert ranks[0]["weights"] == ranks[1]["weights"]  # and the replicas stayed identical
