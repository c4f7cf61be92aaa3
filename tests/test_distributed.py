"""Real 2-process runs on CPU (gloo): `python -m train` with DDP and DeepSpeed ZeRO-2 trains the tiny
MLLM with a plan active, evaluates on both ranks' shares, checkpoints and exports the trained weights."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import MLLM

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "run_name=dist", "arch=vica", "trainer.accelerator=cpu", "trainer.devices=2",
    "trainer.max_steps=4", "trainer.val_check_interval=4",
    "data.source.n_train=64", "data.source.n_val=24", "data.num_workers=0", "data.batch_size=4",
    "model.config.text.num_hidden_layers=2", "model.config.vision.num_hidden_layers=2",
]


def train_two_ranks(tmp_path: Path, *overrides: str) -> tuple[Path, dict]:
    cmd = [sys.executable, "-m", "train", f"paths.root_dir={tmp_path}", *SMALL, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run,) = (tmp_path / "outputs" / "dist").iterdir()
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["steps"] == 4 and summary["arch"] == "vica"
    assert 0.0 <= summary["metrics"]["val/acc"] <= 1.0
    return run, summary


def assert_export_matches(run: Path, state: dict[str, torch.Tensor]) -> None:
    exported = MLLM.from_pretrained(run / "export").state_dict()
    assert state, "no trained weights in the checkpoint"
    for name, tensor in state.items():
        assert torch.equal(exported[name.removeprefix("model.")], tensor), name


@pytest.mark.slow
def test_ddp_two_cpu_ranks(tmp_path):
    run, summary = train_two_ranks(tmp_path, "strategy=ddp")
    ckpt = torch.load(summary["best_checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    assert_export_matches(run, ckpt["state_dict"])


@pytest.mark.slow
def test_deepspeed_zero2_two_cpu_ranks_partitions_optimizer_state(tmp_path):
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    run, summary = train_two_ranks(tmp_path, "strategy=deepspeed_zero2")
    ckpt_dir = Path(summary["best_checkpoint"])
    shards = sorted(p.name for p in ckpt_dir.rglob("*optim_states.pt"))
    assert len(shards) == 2 and "zero_pp_rank_0" in shards[0] and "zero_pp_rank_1" in shards[1]
    consolidated = convert_zero_checkpoint_to_fp32_state_dict(ckpt_dir, tmp_path / "full.ckpt")
    assert consolidated["global_step"] == 4
    assert_export_matches(run, consolidated["state_dict"])


def test_zero3_refuses_clearly():
    from train.strategies import deepspeed

    with pytest.raises(NotImplementedError, match="strategy=deepspeed_zero2 or ddp"):
        deepspeed(stage=3)
