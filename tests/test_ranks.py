"""Each rank of a multi-process job names its host, global and node-local rank and the rendezvous
(train/infra/ranks.py), read from the launcher's environment before the process group exists."""

from __future__ import annotations

import socket

import lightning as L
import pytest

from train.infra.ranks import rank_line

SLURM_RANK_3_OF_4 = {  # what srun sets for the 4th task of `sbatch --nodes=2 --ntasks-per-node=2`
    "SLURM_JOB_ID": "4321", "SLURM_JOB_NAME": "emllm", "SLURM_NTASKS": "4", "SLURM_NNODES": "2",
    "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
    "SLURM_NODELIST": "gpu[017-018]",
}


def test_a_slurm_rank_names_its_host_ranks_and_rendezvous(monkeypatch, restore_environ):
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in SLURM_RANK_3_OF_4.items():
        monkeypatch.setenv(key, value)
    trainer = L.Trainer(accelerator="cpu", devices=2, num_nodes=2, strategy="ddp", logger=False, enable_progress_bar=False)
    assert rank_line(trainer) == (f"rank 3 of 4 on host {socket.gethostname()} (node 1 of 2, local rank 1 of 2); "
                                  "rendezvous at gpu017:19321 (SLURMEnvironment)")  # the first node, 15000 + last 4 digits


@pytest.mark.parametrize("strategy", ["auto", "ddp"])
def test_a_single_process_run_has_no_rank_line(strategy, restore_environ):
    assert rank_line(L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False)) is None
