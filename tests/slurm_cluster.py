"""A real single-node Slurm cluster on this machine for the Slurm tests: munged + slurmctld + slurmd
with a generated slurm.conf (Debian's `slurm-wlm` and `munge`, installed by `.ci/run`).

`start(workdir)` returns a `Cluster` or, when Slurm cannot run here (not installed, not root, a
daemon does not come up), the reason as a string so the tests skip with it. The two-node cluster
(tests/slurm_two_nodes.py) reuses `Cluster`, `start_munged` and `wait_until_idle`.

`AuthInfo=cred_expire` is Slurm's job credential lifetime, and also how long a requeued job is held
before it may start again (default 120 s, minimum 5). Launches here reach slurmd within a second or
two, so a short lifetime only shortens the hold that the requeue tests would otherwise sit through.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

# What both test clusters schedule alike (one CPU per task, requeue on, no accounting).
SCHEDULING = """\
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
KillWait=10
MinJobAge=600
InactiveLimit=0
"""
SLURM_CONF = """\
ClusterName=emllm-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={dir}/munge/munge.socket,cred_expire={cred_expire}
CredType=cred/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
{scheduling}NodeName={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


CRED_EXPIRE = 15  # seconds; see the module docstring


@dataclass
class Cluster:
    dir: Path
    env: dict[str, str]
    procs: list[subprocess.Popen]
    enter: tuple[str, ...] = ()  # prefix that runs a client command where the controller is reachable

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*self.enter, *cmd], env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
        """Submit; `env` adds variables for this job alone (sbatch passes its environment to the job)."""
        out = subprocess.run([*self.enter, "sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().split(";")[0]

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def wait(self, job_id: str, timeout: float, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")) -> str:
        end = time.time() + timeout
        while time.time() < end:
            state = self.job_state(job_id)
            if state in until:
                return state
            time.sleep(1)
        return self.job_state(job_id)

    def cancel_all_jobs(self, timeout: float = 30) -> None:
        """scancel every job and wait until Slurm has ended them: slurmstepd outlives slurmd by design, so a
        job still running at tear-down would otherwise keep its processes running after the cluster is gone."""
        if any(p.poll() is not None for p in self.procs):
            return  # a daemon is gone: nothing to ask
        self.run("scancel", "--full", "--user=root", check=False)
        end = time.time() + timeout
        while time.time() < end:
            out = self.run("squeue", "-h", "-t", "all", "-o", "%T", check=False)
            if out.returncode or not set(out.stdout.split()) - {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL",
                                                                  "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}:
                return
            time.sleep(0.5)

    def stop(self) -> None:
        self.cancel_all_jobs()
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_binaries(extra: tuple[str, ...] = ()) -> list[str]:
    return [b for b in ("munged", "slurmctld", "slurmd", "sbatch", *extra) if not shutil.which(b)]


def start_munged(munge_dir: Path, env: dict[str, str], prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """munged with a fresh key and its socket in `munge_dir` (`AuthInfo=socket=...` points there)."""
    munge_dir.mkdir(parents=True, exist_ok=True)
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    return subprocess.Popen(
        [*prefix, "munged", "--foreground", "--force", f"--key-file={key}", f"--socket={munge_dir / 'munge.socket'}",
         f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
         f"--seed-file={munge_dir / 'munged.seed'}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def wait_until_idle(cluster: Cluster, nodes: int, timeout: float = 30) -> bool:
    """True once sinfo lists `nodes` idle nodes; False when a daemon died or the time ran out."""
    end = time.time() + timeout
    while time.time() < end:
        if any(p.poll() is not None for p in cluster.procs):
            return False
        out = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        states = out.stdout.split()
        if out.returncode == 0 and len(states) == nodes and all(s.rstrip("*") in ("idle", "mixed") for s in states):
            return True
        time.sleep(0.5)
    return False


def log_tails(paths) -> str:
    return "".join(f"--- {p.name}\n{p.read_text()[-800:]}" for p in paths if p.exists())[-3000:]


def start(workdir: Path) -> Cluster | str:
    missing = missing_binaries()
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "the local Slurm test cluster runs its daemons as root"
    workdir.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool"):
        (workdir / sub).mkdir(exist_ok=True)
    host = socket.gethostname().split(".")[0]
    mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
    conf = workdir / "slurm.conf"
    conf.write_text(SLURM_CONF.format(scheduling=SCHEDULING, host=host, dir=workdir, cpus=os.cpu_count(), mem_mb=mem_mb, cred_expire=CRED_EXPIRE,
                                      ctld_port=_free_port(), d_port=_free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf)}  # clients (sbatch, squeue, ...) read this cluster's config
    procs = [start_munged(workdir / "munge", env)]
    for daemon in ("slurmctld", "slurmd"):
        procs.append(subprocess.Popen([daemon, "-D", "-f", str(conf)], env=env,
                                      stdout=open(workdir / f"{daemon}.stdout", "w"), stderr=subprocess.STDOUT))
    cluster = Cluster(workdir, env, procs)
    if wait_until_idle(cluster, nodes=1):
        return cluster
    logs = log_tails([workdir / "slurmctld.log", workdir / "slurmd.log"])
    cluster.stop()
    return f"the local Slurm cluster did not come up: {logs}"
