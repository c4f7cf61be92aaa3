"""Against a real two-node Slurm cluster on this machine (tests/slurm_two_nodes.py): `sbatch --nodes=2
--ntasks-per-node=2 slurm/train.sbatch` runs 4 gloo ranks on two hosts for DDP, DeepSpeed ZeRO-3 and
FSDP2, and each run equals a one-node 4-rank run of the same seed. The run directory shows it: one line
per rank naming its host and ranks; the export, metrics.json and checkpoint clean-up happen once; a
sharded checkpoint is complete. A node-local data cache is built once per node, a shared one once. A run
directory that only one node sees stops the job at once. SIGUSR1 to the 2-node job saves, requeues, and
the job resumes exactly: its loss rows equal those of the uninterrupted run.

The 2-node DDP job is the requeued one, so one job shows both: its rows, before and after the requeue,
equal the uninterrupted one-node run's bit for bit. Every job is submitted when the module starts (the
requeue job first: it is signalled as soon as it trains), so that start-ups, Slurm's requeue hold and
training overlap; each test then waits for its own. Each 4-rank job pays ~15 CPU-seconds of imports per
rank, which is most of this module's time on two cores. Skipped, with the reason, only when Slurm, munge
or iproute2 are missing or the session is not root.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests import slurm_two_nodes

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SBATCH = str(ROOT / "slurm" / "train.sbatch")
TINY = [
    "data.source.n_train=64", "data.source.n_val=12", "data.num_workers=0", "data.batch_size=4",
    "model.config.text.num_hidden_layers=2", "model.config.vision.num_hidden_layers=2", "logger=csv",
    "trainer.log_every_n_steps=1",
]
# two evaluations, the second better: the checkpoint callback deletes the first best (clean-up on rank 0)
DDP = ["strategy=ddp", "trainer.max_steps=16", "trainer.val_check_interval=8",
       "callbacks.checkpoint.monitor=val/loss", "callbacks.checkpoint.mode=min"]
ZERO3 = ["strategy=deepspeed_zero3", "trainer.max_steps=4", "trainer.val_check_interval=4"]
FSDP2 = ["strategy=fsdp", "trainer.max_steps=4", "trainer.val_check_interval=4"]
TIMING = ("perf/", "eff/prefill_ms", "eff/decode_ms_per_token", "eff/peak_mem_mb")  # measured, not computed
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
# stale leftovers of interrupted saves that rank 0 removes when training starts (train/infra/resume.py tidy)
STALE = ("checkpoints/.last.ckpt.4242.deadbeef.partial", ".export.1234abcd.partial/model.safetensors")


@dataclass
class Job:
    id: str
    workdir: Path
    run_dir: Path

    def log(self) -> str:
        """The job's Slurm output: the batch script's lines and every rank's stdout and stderr."""
        path = self.workdir / f"emllm-{self.id}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def run_log(self) -> str:
        """Every rank's log records, which the ranks write themselves into the run directory."""
        path = self.run_dir / "run.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def summary(self) -> dict:
        return json.loads((self.run_dir / "metrics.json").read_text())


def submit(cluster, workdir: Path, nodes: int, tasks: int, *overrides: str, run_dir: Path | None = None,
           data_dir: Path | None = None) -> Job:
    workdir.mkdir(parents=True, exist_ok=True)
    env = {"EMLLM_ROOT": str(workdir), "EMLLM_PYTHON": sys.executable,
           "PYTHONPATH": str(ROOT)}  # the jobs run the tree under test, not whatever the interpreter has installed
    if run_dir is not None:
        env["EMLLM_RUN_DIR"] = str(run_dir)
    if data_dir is not None:
        env["EMLLM_DATA"] = str(data_dir)
    job = cluster.sbatch(f"--nodes={nodes}", f"--ntasks-per-node={tasks}", "--cpus-per-task=1", "--time=30", SBATCH,
                         *TINY, *overrides, cwd=workdir, env=env)
    return Job(job, workdir, run_dir or workdir / "outputs" / "slurm" / f"emllm-{job}")


def wait_for_file(cluster, job: Job, path: Path, timeout: float = 600) -> None:
    end = time.time() + timeout
    while not path.exists():
        if time.time() > end or cluster.job_state(job.id) in DONE:
            raise AssertionError(f"job {job.id} never wrote {path}:\n{job.log()[-3000:]}")
        time.sleep(0.5)


def finished(cluster, job: Job, timeout: float = 900) -> Job:
    state = cluster.wait(job.id, timeout=timeout, until=DONE)
    assert state == "COMPLETED", f"job {job.id}: {state}\n{job.log()[-4000:]}"
    return job


def outcome(job: Job) -> dict[str, float]:
    """The run's final metrics, less the measured timings and memory."""
    return {k: v for k, v in job.summary()["metrics"].items() if not k.startswith(TIMING)}


def loss_rows(job: Job) -> dict[int, float]:
    """train/loss per step over every attempt (a requeued run keeps its first attempt's as metrics.1.csv)."""
    rows: dict[int, list[float]] = {}
    for path in sorted((job.run_dir / "csv").glob("metrics*.csv")):
        with open(path) as f:
            for r in csv.DictReader(f):
                if r.get("train/loss"):
                    rows.setdefault(int(r["step"]), []).append(float(r["train/loss"]))
    assert all(len(v) == 1 for v in rows.values()), {s: v for s, v in rows.items() if len(v) > 1}  # each step once
    return {s: v[0] for s, v in rows.items()}


def rank_hosts(text: str, world: int = 4) -> dict[int, list[str]]:
    """Host named by each `rank <r> of <world> on host <h>` line (train/infra/ranks.py)."""
    found: dict[int, list[str]] = {}
    for rank, host in re.findall(rf"rank (\d+) of {world} on host (\S+) ", text):
        found.setdefault(int(rank), []).append(host)
    return found


def assert_equal_runs(one_node: Job, two_nodes: Job, name: str) -> None:
    a, b = outcome(one_node), outcome(two_nodes)
    print(f"\n{name}: 1 node x 4 ranks {json.dumps(a, sort_keys=True)}\n{name}: 2 nodes x 2 ranks {json.dumps(b, sort_keys=True)}")
    assert a == b, {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert loss_rows(one_node) == loss_rows(two_nodes)
    assert one_node.summary()["steps"] == two_nodes.summary()["steps"] > 0


def assert_placed_on_two_nodes(one_node: Job, two_nodes: Job, attempts: int = 1) -> None:
    """One line per rank and attempt: ranks 0-1 on node1 and 2-3 on node2 (block distribution); all four on one host."""
    expected = {0: ["node1"] * attempts, 1: ["node1"] * attempts, 2: ["node2"] * attempts, 3: ["node2"] * attempts}
    assert rank_hosts(two_nodes.run_log()) == expected, two_nodes.log()[-3000:]
    hosts = rank_hosts(one_node.run_log())
    assert sorted(hosts) == [0, 1, 2, 3] and len({h for v in hosts.values() for h in v}) == 1 and all(len(v) == 1 for v in hosts.values())
    assert "2 nodes x 2 tasks" in two_nodes.log() and "rendezvous at node1:" in two_nodes.run_log()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    started = slurm_two_nodes.start(tmp_path_factory.mktemp("two-nodes"))
    if isinstance(started, str):
        pytest.skip(started)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory) -> dict[str, Job]:
    ddp, zero3, fsdp2, other = (tmp_path_factory.mktemp(n) for n in ("ddp", "zero3", "fsdp2", "not-shared"))
    out = {}
    two_node_run = ddp / "runs" / "two-nodes"  # a fixed run directory, planted with what interrupted saves leave
    for stale in STALE:
        (two_node_run / stale).parent.mkdir(parents=True, exist_ok=True)
        (two_node_run / stale).write_bytes(b"half-written")
    # signalled once it trains (what Slurm's `--signal=SIGUSR1@90` sends before the time limit); its
    # requeue hold and second start then overlap the other jobs
    out["ddp_2"] = submit(cluster, ddp, 2, 2, *DDP, run_dir=two_node_run)
    wait_for_file(cluster, out["ddp_2"], two_node_run / "csv" / "metrics.csv")  # written at step 8's evaluation, of 16
    cluster.run("scancel", "--signal=USR1", out["ddp_2"].id)
    out["ddp_1"] = submit(cluster, ddp, 1, 4, *DDP)
    out["zero3_1"] = submit(cluster, zero3, 1, 4, *ZERO3)
    # every node sees its own <cluster>/local: the data cache on each node's own disk
    out["zero3_2"] = submit(cluster, zero3, 2, 2, *ZERO3, data_dir=cluster.dir / "local" / "zero3-data")
    out["not_shared"] = submit(cluster, other, 2, 1, *DDP, run_dir=cluster.dir / "local" / "run")
    out["fsdp2_1"] = submit(cluster, fsdp2, 1, 4, *FSDP2)
    out["fsdp2_2"] = submit(cluster, fsdp2, 2, 2, *FSDP2)
    yield out
    for job in out.values():  # nothing of a failed test keeps running into the next module
        cluster.run("scancel", job.id, check=False)


def test_ddp_on_two_nodes_equals_one_node_and_rank_zero_writes_once(cluster, jobs):
    one, two = finished(cluster, jobs["ddp_1"]), finished(cluster, jobs["ddp_2"])
    assert_equal_runs(one, two, "ddp")  # the 2-node job was requeued midway (next test)
    assert_placed_on_two_nodes(one, two, attempts=2)
    log = two.run_log()
    # exports, metrics.json and checkpoint clean-up: global rank 0 alone, once
    assert log.count(f"model weights saved to {two.run_dir / 'export'}") == 1, log[-3000:]
    assert two.log().count("== tiny / vica: 16 steps") == 1 and two.summary()["export"] == str(two.run_dir / "export")
    for stale in STALE:
        removed = two.run_dir / stale.split("/model.safetensors")[0]
        assert not removed.exists() and log.count(f"removed {removed}, left by an interrupted save") == 1, log[-3000:]
    assert sorted(p.name for p in (two.run_dir / "checkpoints").iterdir()) == ["last.ckpt", "step000016.ckpt"]
    # the shared data cache (one filesystem for every node and job here) was built once for both jobs
    built = [j.run_log().count("generated the synthetic dataset") for j in (one, two)]
    assert sum(built) == 1, built


def test_requeue_across_two_nodes_resumes_exactly(cluster, jobs):
    job, uninterrupted = finished(cluster, jobs["ddp_2"]), finished(cluster, jobs["ddp_1"])
    log, run_log = job.log(), job.run_log()
    assert "(restart 1) on node[1-2]: 2 nodes x 2 tasks" in log, log[-3000:]
    saved = re.search(r"SIGUSR1 at step (\d+): saved (\S+hpc_ckpt_1\.ckpt)", run_log)
    assert saved and "requeued Slurm job" in run_log, run_log[-3000:]
    assert run_log.count(f"resuming from {saved[2]}") == 4  # every rank of the second attempt, on both nodes
    got, expected = loss_rows(job), loss_rows(uninterrupted)
    step = int(saved[1])
    print(f"\nrequeued at step {step}: {len(got)} loss rows; of the {sum(s >= step for s in got)} trained after the "
          f"requeue, {sum(got[s] == expected.get(s) for s in got if s >= step)} equal the uninterrupted run's")
    assert 0 < step < 16 and sorted(got) == list(range(16))
    assert got == expected, {s: (expected.get(s), got.get(s)) for s in expected.keys() | got.keys() if expected.get(s) != got.get(s)}
    assert job.summary()["steps"] == 16 and len(job.summary()["seconds"]["earlier_attempts"]) == 1


def test_zero3_on_two_nodes_with_node_local_data_equals_one_node(cluster, jobs):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from models import MLLM

    one, two = finished(cluster, jobs["zero3_1"]), finished(cluster, jobs["zero3_2"])
    assert_equal_runs(one, two, "deepspeed_zero3")
    assert_placed_on_two_nodes(one, two)
    # the node-local cache: each node built its own (one of its two ranks), the same dataset
    log = two.run_log()
    assert log.count(f"generated the synthetic dataset {cluster.dir}/local/zero3-data/synthetic-") == 2, log[-3000:]
    assert sorted(re.findall(r"generated the synthetic dataset \S+ on (\S+)", log)) == ["node1", "node2"]
    caches = [sorted((cluster.dir / "nodes" / n / "local" / "zero3-data").glob("synthetic-*/*.tar")) for n in ("node1", "node2")]
    assert caches[0] and [p.read_bytes() for p in caches[0]] == [p.read_bytes() for p in caches[1]]
    # the sharded checkpoints: every rank's partition is in the shared run directory
    for name in ("last.ckpt", "step000004.ckpt"):
        ckpt = two.run_dir / "checkpoints" / name
        assert sorted(p.name for p in (ckpt / "checkpoint").iterdir()) == [
            f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in range(4) for kind in ("model", "optim")]
        assert (ckpt / "latest").is_file()
    state = get_fp32_state_dict_from_zero_checkpoint(str(two.run_dir / "checkpoints" / "last.ckpt"), tag="checkpoint")
    exported = MLLM.from_pretrained(two.run_dir / "export").state_dict()
    assert state and all(torch.equal(exported[k.removeprefix("model.")], v) for k, v in state.items())


def test_fsdp2_on_two_nodes_equals_one_node(cluster, jobs):
    one, two = finished(cluster, jobs["fsdp2_1"]), finished(cluster, jobs["fsdp2_2"])
    assert_equal_runs(one, two, "fsdp2")
    assert_placed_on_two_nodes(one, two)
    shards = sorted(p.name for p in (two.run_dir / "checkpoints" / "last.ckpt").glob("*.distcp"))
    assert shards == [f"__{r}_0.distcp" for r in range(4)]


def test_a_run_directory_that_one_node_cannot_see_stops_the_job(cluster, jobs):
    job = jobs["not_shared"]
    state = cluster.wait(job.id, timeout=600, until=DONE)
    log = job.log()
    assert state == "FAILED", f"{state}\n{log[-3000:]}"
    assert "the run directory is not shared by all nodes of this 2-node job" in log, log[-3000:]
    assert "rank 1 on node2 does not see it in" in log, log[-3000:]
    local = cluster.dir / "nodes" / "node1" / "local" / "run"
    assert not (local / "checkpoints").exists() or not any((local / "checkpoints").iterdir())  # it stopped before training
