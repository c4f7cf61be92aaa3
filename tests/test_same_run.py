"""A run directory used again: resuming a different experiment is refused with the list of differences,
settings that do not change the experiment pass with a note, a finished run is left alone, and
`resume.extend_to` continues it with the wall time of every attempt counted (train/infra/same_run.py)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from models.config import ConfigError
from train.infra.same_run import ResumeOptions, RunRecord, check_resume, config_changes, finished_summary

ROOT = Path(__file__).resolve().parents[1]


def config(**changes) -> dict:
    """A resolved run config (the parts the checks read), with dotted-key changes applied."""
    cfg = {
        "model": {"name": "tiny", "gradient_checkpointing": False},
        "arch": {"methods": {"vica": {"t2v_layers": [0, 1, 2]}}},
        "data": {"batch_size": 32, "eval_batch_size": 64, "num_workers": 2, "source": {"seed": 0}},
        "optim": {"lr": 1e-3},
        "seed": 0,
        "trainer": {"max_steps": 650, "devices": 1, "log_every_n_steps": 10, "accumulate_grad_batches": 1},
        "strategy": {"name": "ddp"},
        "logger": {"csv": {"name": "csv"}},
        "ckpt_path": "auto",
        "resume": {"allow_changes": False, "extend_to": None},
    }
    for key, value in changes.items():
        *parents, leaf = key.split("__")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def test_changes_are_split_into_the_experiment_and_how_it_runs():
    now = config(arch={"methods": {}}, data__batch_size=16, data__num_workers=4, data__eval_batch_size=8,
                 trainer__devices=2, trainer__log_every_n_steps=1, ckpt_path="/x/last.ckpt", resume__extend_to=900)
    changes = config_changes(config(), now)
    assert changes.experiment == ["arch.methods: (absent) -> {}", "arch.methods.vica.t2v_layers: [0, 1, 2] -> (absent)",
                                  "data.batch_size: 32 -> 16"]
    assert changes.other == ["data.eval_batch_size: 64 -> 8", "data.num_workers: 2 -> 4", "trainer.devices: 1 -> 2",
                             "trainer.log_every_n_steps: 10 -> 1"]
    # DeepSpeed's ZeRO partitions do not re-shard: another device count is refused there
    ds = config_changes(config(strategy={"name": "deepspeed_zero2"}), config(strategy={"name": "deepspeed_zero2"}, trainer__devices=2))
    assert ds.experiment == ["trainer.devices: 1 -> 2"]
    assert config_changes(config(), config(trainer__max_steps=900), ignore=("trainer.max_steps",)).experiment == []


def test_resuming_another_experiment_is_refused_unless_allowed(caplog):
    saved, now = config(), config(optim__lr=2e-4, seed=1, logger={"csv": {"name": "other"}})
    with pytest.raises(ConfigError) as err:
        check_resume(saved, now, "last.ckpt")
    message = str(err.value)
    assert "last.ckpt belongs to a different experiment" in message
    assert "optim.lr: 0.001 -> 0.0002; seed: 0 -> 1" in message and "resume.allow_changes=true" in message
    assert "logger" not in message
    with caplog.at_level("INFO"):
        check_resume(saved, now, "last.ckpt", allow_changes=True)
        check_resume(None, now, "old.ckpt")
    assert "resume.allow_changes=true: continuing last.ckpt as a different experiment" in caplog.text
    assert "logger.csv.name: 'csv' -> 'other'" in caplog.text  # noted, not refused
    assert "old.ckpt records no run config" in caplog.text


def test_every_checkpoint_carries_the_config_and_the_attempts_seconds():
    record = RunRecord(config(), started=time.time() - 30)
    checkpoint: dict = {}
    record.on_save_checkpoint(None, None, checkpoint)
    assert checkpoint["run_config"] == config() and 29 < checkpoint["attempt_seconds"][0] < 60
    resumed = RunRecord(config(), started=time.time())
    resumed.resumed({"run_config": config(), "attempt_seconds": [30.0, 12.5]}, "last.ckpt")
    assert resumed.earlier == [30.0, 12.5]
    with pytest.raises(ConfigError, match="data.batch_size: 32 -> 8"):
        RunRecord(config(data__batch_size=8), started=time.time()).resumed(checkpoint, "last.ckpt")


def test_a_finished_run_is_recognised(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"steps": 650, "metrics": {"val/acc": 0.7}}))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config()))
    assert finished_summary(tmp_path, config(), 650)["steps"] == 650
    assert finished_summary(tmp_path, config(logger={}), 650) is not None  # another logger: the same run
    assert finished_summary(tmp_path, config(trainer__max_steps=900), 900) is None  # more steps asked for
    assert finished_summary(tmp_path, config(arch={}), 650) is None  # another experiment: resuming decides
    with pytest.raises(ConfigError, match="resume.extend_to is the step count"):
        ResumeOptions(extend_to=0)


# --- the real thing ---------------------------------------------------------------------------------------
TINY = [
    "run_name=again", "trainer.accelerator=cpu", "trainer.max_steps=4", "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1", "data.source.n_train=16", "data.source.n_val=4", "data.batch_size=2",
    "data.num_workers=0", "model.config.text.num_hidden_layers=1", "model.config.vision.num_hidden_layers=2",
    "export=false", "eval.noimage=false",
]


def train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "train", f"paths.root_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}",
           f"hydra.run.dir={tmp_path / 'run'}", *TINY, *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def loss_steps(metrics_csv: Path) -> list[int]:
    with open(metrics_csv) as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.slow
def test_a_run_directory_used_again(tmp_path):
    run = tmp_path / "run"
    first = train(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    results = {name: (run / name).read_bytes() for name in ("metrics.json", "config.yaml", "csv/metrics.csv")}

    again = train(tmp_path)  # the same command: nothing to do, results untouched
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"this run already finished (4 steps); its results are left as they are in {run}/metrics.json" in again.stdout
    assert {name: (run / name).read_bytes() for name in results} == results

    other = train(tmp_path, "optim.lr=0.0123")  # another experiment: refused, run directory untouched
    assert other.returncode == 2 and re.search(r"Differences \(checkpoint -> now\): optim\.lr: [\d.e-]+ -> 0\.0123\.",
                                               other.stderr), other.stderr[-3000:]
    assert {name: (run / name).read_bytes() for name in results} == results and not (run / "error.txt").exists()

    extended = train(tmp_path, "resume.extend_to=6")
    assert extended.returncode == 0, extended.stderr[-3000:]
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["steps"] == 6 and "train/loss" in summary["metrics"]
    seconds = summary["seconds"]
    assert len(seconds["earlier_attempts"]) == 1 and seconds["all_attempts"] > seconds["total"]
    assert f"6 steps in {seconds['all_attempts']} s (2 attempts)" in extended.stdout
    assert loss_steps(run / "csv" / "metrics.1.csv") == [0, 1, 2, 3]  # the first attempt's log is kept
    assert loss_steps(run / "csv" / "metrics.csv") == [4, 5]
