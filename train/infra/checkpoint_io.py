"""Checkpoint files that are either the old one or the complete new one, never a truncated mix.

Lightning's TorchCheckpointIO serialises to memory, then writes through an fsspec transaction whose
temporary file lives in the system temp dir: when that is another filesystem the final move is a copy
into place, and nothing is fsynced, so a kill or power loss mid-copy can leave a truncated `last.ckpt`.
Here the bytes go to a temporary file beside the target, are fsynced, and replace it with one rename.

DeepSpeed (and sharded FSDP) checkpoints are directories written by the engine itself, bypassing
CheckpointIO; `train.resume.PeriodicCheckpoint` stages those and swaps them in (see there).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO


def fsync_dir(path: str | Path) -> None:
    """Make a rename in `path` durable (where the OS allows opening directories)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the target's directory, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are atomic (remote URLs keep Lightning's transaction)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)
