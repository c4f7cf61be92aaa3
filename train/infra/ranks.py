"""Which process is which, in multi-process jobs: one log line per rank, before the ranks meet.

`rank 2 of 4 on host node2 (node 1 of 2, local rank 0 of 2); rendezvous at node1:15012 (SLURMEnvironment)`

Every rank prints its own line as soon as the trainer is built, before the process group is set up:
when a multi-node job hangs at the start, the lines that are there say which ranks got as far as the
rendezvous, on which host, and the address and port they were told to meet at (the first node of the
allocation under Slurm, a port derived from the job id); the missing ones point at the node to look at.
Lightning's own `Initializing distributed: GLOBAL_RANK: ..` line comes later and names no host.
"""

from __future__ import annotations

import logging
import socket

import lightning as L

log = logging.getLogger(__name__)


def rank_line(trainer: L.Trainer) -> str | None:
    """This process's place in the job, or None for a single-process run."""
    strategy = trainer.strategy
    env = getattr(strategy, "cluster_environment", None)
    nodes, per_node = getattr(strategy, "num_nodes", 1), getattr(strategy, "num_processes", 1)
    if env is None or nodes * per_node == 1:
        return None
    local, node = env.local_rank(), env.node_rank()
    # a launcher outside Lightning (srun, torchrun) numbers the ranks; Lightning's own numbers them this way
    rank = env.global_rank() if env.creates_processes_externally else node * per_node + local
    return (f"rank {rank} of {nodes * per_node} on host {socket.gethostname()} (node {node} of {nodes}, local rank "
            f"{local} of {per_node}); rendezvous at {env.main_address}:{env.main_port} ({type(env).__name__})")


def log_rank(trainer: L.Trainer) -> None:
    line = rank_line(trainer)
    if line:
        log.info(line)
