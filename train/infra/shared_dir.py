"""A multi-node job's run directory must be one directory that every node sees; the job checks.

What lives there is written by some ranks and read by all: sharded checkpoints hold a part from every
rank (DeepSpeed's `zero_pp_rank_<r>_*` files, FSDP2's `__<r>_0.distcp`); global rank 0 alone writes DDP
checkpoints, `metrics.json` and the export and tidies what interrupted saves left; every rank looks there
for the checkpoint to resume from (`ckpt_path: auto`). On a node-local directory (a node's /tmp or
local scratch) each node sees only its own part: every node's copy of a sharded checkpoint is
incomplete, and after a requeue the first node resumes while the others start afresh, so the ranks train
different steps and, at best, crash at the first collective that does not match.

`SharedRunDir.setup` runs on every rank after the process group exists and before anything is
restored or written: global rank 0 puts a marker file in the run directory and each checkpoint
directory, every rank looks for it, and when a rank cannot see one the job stops on every rank at once
with one message naming the directories and the hosts that could not see them. Single-node jobs skip it.
The data cache may be node-local (each node then builds its own, data/synthetic.py); the run directory
may not.
"""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

import lightning as L
import torch.distributed as dist

from models.config import ConfigError

from .resume import checkpoint_dirs

MARKER = ".shared-by-all-nodes-{}"
PATIENCE_S = 5.0  # for filesystems that show another client's new file a little later


def unseen(dirs: list[Path], name: str, patience: float = PATIENCE_S) -> list[str]:
    """The directories in which `name` does not appear within `patience` seconds."""
    end = time.monotonic() + patience
    while True:
        missing = [str(d) for d in dirs if not (d / name).is_file()]
        if not missing or time.monotonic() > end:
            return missing
        time.sleep(0.2)


class SharedRunDir(L.Callback):
    """Stop a multi-node job whose run or checkpoint directories are not shared by all its nodes."""

    def __init__(self):
        self.checked = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.checked or trainer.num_nodes == 1 or not (dist.is_available() and dist.is_initialized()):
            return
        self.checked = True
        dirs = checkpoint_dirs(trainer)
        name = MARKER.format(trainer.strategy.broadcast(uuid.uuid4().hex))
        if trainer.is_global_zero:
            for d in dirs:
                d.mkdir(parents=True, exist_ok=True)
                (d / name).write_text(f"written by global rank 0 on {socket.gethostname()}\n")
        trainer.strategy.barrier("SharedRunDir.written")
        reports: list = [None] * trainer.world_size
        dist.all_gather_object(reports, (trainer.global_rank, socket.gethostname(), unseen(dirs, name)))
        if trainer.is_global_zero:
            for d in dirs:
                (d / name).unlink(missing_ok=True)
        blind = [(rank, host, missing) for rank, host, missing in reports if missing]
        if blind:
            who = "; ".join(f"rank {rank} on {host} does not see it in {', '.join(missing)}" for rank, host, missing in blind)
            raise ConfigError(
                f"the run directory is not shared by all nodes of this {trainer.num_nodes}-node job: global rank 0 on "
                f"{reports[0][1]} wrote a file there that other nodes do not see ({who}). Checkpoints (a sharded one has a part from every rank), resuming, metrics.json and "
                "the export need one directory that every node reads and writes: put hydra.run.dir (EMLLM_RUN_DIR for "
                "slurm/train.sbatch) and the checkpoint directories on the cluster's shared filesystem; only the data "
                "cache (paths.data_dir, EMLLM_DATA) may be node-local"
            )
