"""A real two-node Slurm cluster on one machine, for the multi-node tests (tests/test_slurm_multinode.py).

Each node is a set of Linux namespaces held open by one `sleep` process:

* network: its own stack with a loopback and one end of a veth pair (node1 10.213.7.1, node2 10.213.7.2);
  the addresses exist only inside these two namespaces, never on the machine itself;
* UTS: its own hostname (`node1`, `node2`), which is how each slurmd finds its NodeName and what a
  rank running there reports;
* mount: a hosts file bound over /etc/hosts (both names resolve on both nodes, as cluster DNS would),
  and `<dir>/local` bound to `<dir>/nodes/<name>/local`: one path, another directory on each node,
  like a node's local scratch disk. Everything else (the checkout, the run directories) is the one
  filesystem both nodes see, like a shared cluster filesystem.

slurmctld runs on node1 (a head node that also computes), a slurmd on each node with per-node spool,
pid and log files through `%n`, and one munged on the machine (its socket is a file, reachable from
both nodes: one key, as a cluster shares it). Clients (sbatch, squeue, scontrol) run in node1's network
namespace, the only place the controller's address exists (`Cluster.enter`).

Tear-down (`TwoNodeCluster.stop`): every job cancelled, the daemons, the holders, then any process still
inside the nodes' namespaces (slurmstepd outlives slurmd by design) is killed; the namespaces, the veth
pair and the mounts vanish with their last process. Every process started here also gets a parent-death
signal, so a killed test session leaves no daemon behind; and since nothing binds an address of this
machine, even leftovers could not collide with the single-node test cluster (tests/slurm_cluster.py) or
a later run.

`start(workdir)` returns the `Cluster`, or the reason as a string when the tools are missing or the
session is not root (the tests skip with it); a failure to build namespaces or start a daemon once the
tools are there raises, so the tests fail rather than skip.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.slurm_cluster import CRED_EXPIRE, SCHEDULING, Cluster, log_tails, missing_binaries, start_munged, wait_until_idle

NODES = ("node1", "node2")
SUBNET = "10.213.7"  # node i has SUBNET.i; private, and present only inside the namespaces made here
CPUS_PER_NODE = 6  # configured, not detected (config_overrides): a 1-node 4-task run and a 2-node 2x2 run fit at once
ORPHAN_SIGNAL = ("setpriv", "--pdeathsig", "KILL", "--")  # nothing outlives the test session that started it

SLURM_CONF = """\
ClusterName=emllm-two-nodes
SlurmctldHost=node1({subnet}.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={dir}/munge/munge.socket,cred_expire={cred_expire}
CredType=cred/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/run/slurmctld.pid
SlurmdPidFile={dir}/run/slurmd-%n.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
SlurmdParameters=config_overrides
{scheduling}{nodes}
PartitionName=debug Nodes=node[1-{n}] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


@dataclass
class Node:
    name: str
    address: str
    holder: subprocess.Popen  # `sleep infinity` in the node's namespaces

    def enter(self, net: bool = True, uts: bool = True, mount: bool = True) -> tuple[str, ...]:
        flags = [f for f, on in (("-n", net), ("-u", uts), ("-m", mount)) if on]
        return ("nsenter", "-t", str(self.holder.pid), *flags, "--")


@dataclass
class TwoNodeCluster(Cluster):
    nodes: list[Node] = field(default_factory=list)
    net_namespaces: set[str] = field(default_factory=set)  # the nodes' `net:[inode]`, which outlive the holders

    def stop(self) -> None:
        """Jobs cancelled, daemons and holders ended, then whatever still runs inside the nodes' namespaces
        (a job step that did not end in time) is killed: every process there belongs to this cluster."""
        super().stop()
        end = time.time() + 10
        while (left := processes_in(self.net_namespaces)) and time.time() < end:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)


def processes_in(net_namespaces: set[str]) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.readlink(proc / "ns" / "net") in net_namespaces:
                    pids.append(int(proc.name))
            except OSError:
                pass  # gone meanwhile
    return pids


def sh(*cmd: str) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if out.returncode:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({out.returncode}): {out.stderr.strip()}")


def namespaces(pid: int | str) -> dict[str, str]:
    return {ns: os.readlink(f"/proc/{pid}/ns/{ns}") for ns in ("net", "uts", "mnt")}


def hold_namespaces(name: str) -> subprocess.Popen:
    """A process in new network, UTS and mount namespaces; returns once it is inside them all."""
    proc = subprocess.Popen([*ORPHAN_SIGNAL, "unshare", "--net", "--uts", "--mount", "--propagation", "private",
                             "--", "sleep", "infinity"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    own, end = namespaces("self"), time.time() + 10
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"could not create the namespaces of {name}: {proc.stderr.read().decode().strip()}")
        try:
            if all(namespaces(proc.pid)[ns] != own[ns] for ns in own):
                return proc
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"the namespaces of {name} were not ready after 10 s")


def build_nodes(workdir: Path, tag: str) -> list[Node]:
    """Namespaces, veth pair, addresses, hostnames, hosts file and node-local directories."""
    hosts = workdir / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{SUBNET}.{i} {n}\n" for i, n in enumerate(NODES, 1)))
    (workdir / "local").mkdir(exist_ok=True)  # the mount point; on the machine itself it stays empty
    nodes: list[Node] = []
    try:
        for i, name in enumerate(NODES, 1):
            nodes.append(Node(name, f"{SUBNET}.{i}", hold_namespaces(name)))
        links = [f"em{tag}{chr(97 + i)}" for i in range(len(NODES))]  # <= 15 characters
        sh("ip", "link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for node, link in zip(nodes, links):
            sh("ip", "link", "set", link, "netns", str(node.holder.pid))
            net, uts, mnt = node.enter(uts=False, mount=False), node.enter(net=False, mount=False), node.enter(net=False, uts=False)
            sh(*net, "ip", "link", "set", "lo", "up")
            sh(*net, "ip", "addr", "add", f"{node.address}/24", "dev", link)
            sh(*net, "ip", "link", "set", link, "up")
            sh(*uts, "hostname", node.name)
            local = workdir / "nodes" / node.name / "local"
            local.mkdir(parents=True, exist_ok=True)
            sh(*mnt, "mount", "--bind", str(hosts), "/etc/hosts")
            sh(*mnt, "mount", "--bind", str(local), str(workdir / "local"))
    except Exception:
        for node in nodes:
            node.holder.kill()
            node.holder.wait()
        raise
    return nodes


def start(workdir: Path) -> Cluster | str:
    missing = missing_binaries(("ip", "nsenter", "unshare", "setpriv"))
    if missing:
        return (f"the two-node test cluster needs {', '.join(missing)}: apt-get install slurm-wlm munge iproute2 "
                "(nsenter, unshare and setpriv are util-linux)")
    if os.geteuid() != 0:
        return "the two-node test cluster creates network namespaces and runs Slurm's daemons: it needs root"
    workdir.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool", "run", "log"):
        (workdir / sub).mkdir(exist_ok=True)
    mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
    node_lines = "\n".join(f"NodeName={n} NodeAddr={SUBNET}.{i} CPUs={CPUS_PER_NODE} RealMemory={mem_mb} State=UNKNOWN"
                           for i, n in enumerate(NODES, 1))
    conf = workdir / "slurm.conf"
    conf.write_text(SLURM_CONF.format(scheduling=SCHEDULING, subnet=SUBNET, dir=workdir, cred_expire=CRED_EXPIRE, nodes=node_lines, n=len(NODES)))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    nodes = build_nodes(workdir, tag=str(os.getpid() % 100000))
    procs = [*(n.holder for n in nodes), start_munged(workdir / "munge", env, prefix=ORPHAN_SIGNAL)]
    for node, daemon in [(nodes[0], "slurmctld"), *((n, "slurmd") for n in nodes)]:
        out = open(workdir / "log" / f"{daemon}-{node.name}.stdout", "w")
        procs.append(subprocess.Popen([*ORPHAN_SIGNAL, *node.enter(), daemon, "-D", "-f", str(conf)], env=env,
                                      stdout=out, stderr=subprocess.STDOUT))
    # stop() ends them last to first: the daemons, munged, then the namespace holders
    cluster = TwoNodeCluster(workdir, env, procs, enter=nodes[0].enter(uts=False, mount=False), nodes=nodes,
                             net_namespaces={namespaces(n.holder.pid)["net"] for n in nodes})
    if wait_until_idle(cluster, nodes=len(NODES), timeout=60):
        return cluster
    logs = log_tails(sorted((workdir / "log").iterdir()))
    cluster.stop()
    raise RuntimeError(f"the two-node Slurm cluster did not come up: {logs}")
