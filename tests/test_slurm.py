"""Against a real local Slurm (tests/slurm_cluster.py): `sbatch slurm/train.sbatch` runs a 2-task CPU
DDP job to completion; a job signalled before its time limit requeues itself and resumes from its
checkpoint; a Hydra sweep runs as Slurm jobs through `hydra/launcher=submitit_slurm`.
Skipped, with the reason, only when Slurm cannot be started on this machine."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import slurm_cluster

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SBATCH = str(ROOT / "slurm" / "train.sbatch")
TINY = [
    "data.source.n_train=64", "data.source.n_val=12", "data.num_workers=0", "data.batch_size=4",
    "model.config.text.num_hidden_layers=2", "model.config.vision.num_hidden_layers=2", "logger=csv",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    started = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    if isinstance(started, str):
        pytest.skip(started)
    yield started
    started.stop()


def submit(cluster, workdir: Path, *args: str, tasks: int = 2) -> str:
    cluster.env.update(EMLLM_ROOT=str(workdir), EMLLM_PYTHON=sys.executable)
    return cluster.sbatch("--nodes=1", f"--ntasks-per-node={tasks}", "--cpus-per-task=1", "--time=20", SBATCH, *args,
                          cwd=workdir)


def job_log(workdir: Path, job: str) -> str:
    path = workdir / f"emllm-{job}.out"
    return path.read_text() if path.exists() else ""


def metrics(workdir: Path, job: str) -> dict:
    return json.loads((workdir / "outputs" / "slurm" / f"emllm-{job}" / "metrics.json").read_text())


def test_sbatch_runs_a_two_task_ddp_job(cluster, tmp_path):
    job = submit(cluster, tmp_path, *TINY, "arch=vica", "trainer.max_steps=4", "trainer.val_check_interval=4")
    state = cluster.wait(job, timeout=400)
    log = job_log(tmp_path, job)
    assert state == "COMPLETED", log[-3000:]
    assert "1 nodes x 2 tasks" in log and "MEMBER: 2/2" in log
    summary = metrics(tmp_path, job)
    assert summary["steps"] == 4 and "val/acc" in summary["metrics"]


def test_signalled_job_requeues_and_resumes(cluster, tmp_path):
    steps = 200
    # Two DDP ranks: the signal only sets a flag, the ranks checkpoint together (train/infra/preemption.py)
    job = submit(cluster, tmp_path, *TINY, f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
                 "trainer.log_every_n_steps=1")
    end = time.time() + 300
    # signalled once the progress bar shows 10 steps done: 190 remain (a fast machine trains 10 steps/s; a
    # signal that landed after the last step would find nothing to save)
    while time.time() < end and not re.search(rf"\| [1-9]\d*/{steps} ", job_log(tmp_path, job)):
        time.sleep(0.2)
    # what Slurm sends `--signal=SIGUSR1@90` before the time limit
    cluster.run("scancel", "--signal=USR1", job)
    state = cluster.wait(job, timeout=600)
    log = job_log(tmp_path, job)
    assert state == "COMPLETED", log[-3000:]
    assert "(restart 1)" in log and "1 nodes x 2 tasks" in log, log[-3000:]
    saved = re.search(r"SIGUSR1 at step (\d+): saved .*hpc_ckpt_1.ckpt", log)
    assert saved and int(saved.group(1)) < steps, log[-3000:]
    assert "requeued Slurm job" in log, log[-3000:]
    assert re.search(r"[Rr]estor\w+ .*hpc_ckpt_1.ckpt", log), log[-3000:]
    assert metrics(tmp_path, job)["steps"] == steps


def test_resubmitted_job_continues_the_earlier_jobs_run(cluster, tmp_path):
    first = submit(cluster, tmp_path, *TINY, "trainer.max_steps=2", "trainer.val_check_interval=2")
    assert cluster.wait(first, timeout=400) == "COMPLETED", job_log(tmp_path, first)[-3000:]
    run_dir = f"outputs/slurm/emllm-{first}"
    cluster.env["EMLLM_RUN_DIR"] = run_dir  # docs/cluster.md's resubmission
    try:
        second = submit(cluster, tmp_path, *TINY, "trainer.max_steps=2", "resume.extend_to=4", "trainer.val_check_interval=4")
    finally:
        del cluster.env["EMLLM_RUN_DIR"]
    state = cluster.wait(second, timeout=400)
    log = job_log(tmp_path, second)
    assert state == "COMPLETED", log[-3000:]
    assert f"resuming from {tmp_path / run_dir / 'checkpoints' / 'last.ckpt'}" in log, log[-3000:]
    assert metrics(tmp_path, first)["steps"] == 4 and not (tmp_path / "outputs" / "slurm" / f"emllm-{second}").exists()


def test_hydra_sweep_through_submitit_slurm(cluster, tmp_path):
    env = {**cluster.env, "EMLLM_ROOT": str(tmp_path)}
    cmd = [sys.executable, "-m", "train", "-m", "arch=dense,vica",
           "hydra/launcher=submitit_slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10",
           "trainer.max_steps=2", "trainer.val_check_interval=2", *TINY]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((tmp_path / "outputs" / "multiruns").glob("*/*/metrics.json"))
    assert [json.loads(p.read_text())["arch"] for p in runs] == ["dense", "vica"]
    assert list((tmp_path / "outputs" / "multiruns").glob("*/.submitit/*/*_submission.sh"))
