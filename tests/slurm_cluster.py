"""A real single-node Slurm cluster on this machine for the Slurm tests: munged + slurmctld + slurmd
with a generated slurm.conf (Debian's `slurm-wlm` and `munge`, installed by `.ci/run`).

`start(workdir)` returns a `Cluster` or, when Slurm cannot run here (not installed, not root, a
daemon does not come up), the reason as a string so the tests skip with it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SLURM_CONF = """\
ClusterName=emllm-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={dir}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
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
NodeName={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


@dataclass
class Cluster:
    dir: Path
    env: dict[str, str]
    procs: list[subprocess.Popen]

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def sbatch(self, *args: str, cwd: Path) -> str:
        out = subprocess.run(["sbatch", "--parsable", *args], env=self.env, cwd=cwd, capture_output=True,
                             text=True, timeout=60)
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

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir: Path) -> Cluster | str:
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch") if not shutil.which(b)]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "the local Slurm test cluster runs its daemons as root"
    workdir.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool", "munge"):
        (workdir / sub).mkdir(exist_ok=True)
    host = socket.gethostname().split(".")[0]
    mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
    conf = workdir / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, dir=workdir, cpus=os.cpu_count(), mem_mb=mem_mb,
                                      ctld_port=_free_port(), d_port=_free_port()))
    key = workdir / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    socket_path = workdir / "munge" / "munge.socket"
    env = {**os.environ, "SLURM_CONF": str(conf)}  # clients (sbatch, squeue, ...) read this cluster's config
    procs = []
    munged = subprocess.Popen(
        ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={socket_path}",
         f"--pid-file={workdir / 'munge' / 'munged.pid'}", f"--log-file={workdir / 'munge' / 'munged.log'}",
         f"--seed-file={workdir / 'munge' / 'munged.seed'}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    procs.append(munged)
    for daemon in ("slurmctld", "slurmd"):
        procs.append(subprocess.Popen([daemon, "-D", "-f", str(conf)], env=env,
                                      stdout=open(workdir / f"{daemon}.stdout", "w"), stderr=subprocess.STDOUT))
    cluster = Cluster(workdir, env, procs)
    end = time.time() + 30
    while time.time() < end:
        if any(p.poll() is not None for p in procs):
            break
        out = cluster.run("sinfo", "-h", "-o", "%T", check=False)
        if out.returncode == 0 and out.stdout.strip() in ("idle", "idle*", "mixed"):
            return cluster
        time.sleep(0.5)
    logs = "".join((workdir / f).read_text()[-800:] for f in ("slurmctld.log", "slurmd.log") if (workdir / f).exists())
    cluster.stop()
    return f"the local Slurm cluster did not come up: {logs[-1500:]}"
