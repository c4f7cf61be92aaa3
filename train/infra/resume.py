"""Resume that loses nothing: which checkpoint to resume from (skipping truncated or corrupt ones),
periodic `last` checkpoints, RNG state.

Together with the data position that MLLMDataModule keeps in every checkpoint (data/stream_position.py) and
Lightning's own model / optimizer / scheduler / loop state, a resumed fit continues the loss curve of
the uninterrupted run (tests/test_resume.py kills a run with SIGKILL and checks this per step).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_only

from data.stream_position import gather_ranks
from models.config import ConfigError

from .checkpoint_io import fsync_dir

log = logging.getLogger(__name__)
CKPT_PATH_HELP = (
    "ckpt_path takes a Lightning checkpoint (a .ckpt file, or a DeepSpeed checkpoint directory), "
    "`auto` (resume from the run directory's newest last/hpc checkpoint if there is one), `last` "
    "(the same, but required) or null (start fresh)"
)


# --- which checkpoint --------------------------------------------------------------------------------
def resume_candidates(trainer: L.Trainer) -> list[Path]:
    """Where this trainer writes resumable checkpoints: periodic and ModelCheckpoint `last` files and
    Lightning's Slurm requeue checkpoints (`<default_root_dir>/hpc_ckpt_<n>.ckpt`)."""
    paths = [cb.last_path for cb in trainer.callbacks if isinstance(cb, PeriodicCheckpoint)]
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath:
            paths.append(Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}")
    root = Path(trainer.default_root_dir)
    return list(dict.fromkeys([*paths, *root.glob("hpc_ckpt_*.ckpt")]))


def checkpoint_dirs(trainer: L.Trainer) -> list[Path]:
    """The run directory and the directories the checkpoint callbacks write to."""
    dirs = [Path(trainer.default_root_dir), *(cb.last_path.parent for cb in trainer.callbacks if isinstance(cb, PeriodicCheckpoint))]
    dirs += [Path(cb.dirpath) for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    return list(dict.fromkeys(dirs))


def variants(path: Path) -> list[Path]:
    """`path` and what an interrupted directory swap (`commit`) leaves: the complete staged
    `<path>.partial` and the previous `<path>.old`. Which of them is usable, `checkpoint_problem` says."""
    return [p for p in (path, with_suffix(path, ".partial"), with_suffix(path, ".old")) if p.exists()]


def newest_first(paths) -> list[Path]:
    return sorted(dict.fromkeys(paths), key=lambda p: p.stat().st_mtime, reverse=True)


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from (truncated, corrupt, incomplete), or None when it can. A file is
    opened the way resuming opens it (weights_only, memory-mapped: no tensor data is read); DeepSpeed and
    distributed checkpoint directories write `latest` / `meta.pt` last, so without them a save was cut short."""
    if path.is_dir():
        if (path / "latest").is_file() or (path / "meta.pt").is_file():
            return None
        return "an incomplete checkpoint directory (no `latest` or `meta.pt`: its save was interrupted)"
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure to open it is the answer
        return f"unreadable, truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def resolve_ckpt_path(value: str | None, trainer: L.Trainer) -> str | None:
    """The config's `ckpt_path` as what `trainer.fit` takes (see CKPT_PATH_HELP). Under auto / last an
    unusable newest checkpoint is skipped, with a warning naming it, for the next usable one (an older
    last/hpc checkpoint, else another checkpoint in the run's checkpoint directories, e.g. the best)."""
    if value in (None, "", "null", "none"):
        return None
    if value == "hpc":
        return value
    if value in ("auto", "last"):
        primary = newest_first(v for p in resume_candidates(trainer) for v in variants(p))
        others = newest_first(p for d in checkpoint_dirs(trainer) for p in d.glob("*.ckpt") if p not in primary)
        skipped = []
        for path in [*primary, *others]:
            problem = checkpoint_problem(path)
            if problem is None:
                if skipped:
                    log.warning("skipped %s; resuming from %s instead", "; ".join(skipped), path)
                return str(path)
            skipped.append(f"{path}: {problem}")
        if skipped:
            raise ConfigError(f"ckpt_path={value}: no usable checkpoint to resume from ({'; '.join(skipped)}). Remove them "
                              "to start this run directory afresh, or point ckpt_path at a good checkpoint")
        if value == "last":
            where = ", ".join(str(p) for p in resume_candidates(trainer)) or "(no checkpoint callback configured)"
            raise FileNotFoundError(f"ckpt_path=last but there is no checkpoint at {where}; use ckpt_path=auto to "
                                    "start fresh when there is none, or point ckpt_path at a checkpoint")
        return None
    path = Path(value).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}; {CKPT_PATH_HELP}")
    problem = checkpoint_problem(path)
    if problem:
        raise ConfigError(f"ckpt_path={path} is {problem}; point ckpt_path at another checkpoint, or ckpt_path=null to start fresh")
    return str(path)


def read_record(path: str | Path) -> dict | None:
    """A file checkpoint's top-level entries (tensors memory-mapped, not read), for the checks made before
    any data work; None for checkpoint directories (checked when Lightning loads them) and `hpc`."""
    path = Path(path)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True) if path.is_file() else None


@rank_zero_only
def keep_csv_history(trainer: L.Trainer) -> None:
    """Lightning's CSVLogger deletes an existing metrics.csv; keep an earlier attempt's as metrics.<n>.csv
    (whenever a run directory is used again: resumed, restarted or extended)."""
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            current = Path(logger.log_dir) / "metrics.csv"
            if current.exists():
                n = 1
                while (kept := current.with_name(f"metrics.{n}.csv")).exists():
                    n += 1
                current.rename(kept)
                log.info("kept the previous attempt's metrics as %s", kept)


# --- periodic last checkpoint ---------------------------------------------------------------------------
def with_suffix(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def writes_directories(strategy) -> bool:
    """DeepSpeed and FSDP2's distributed checkpoints are directories written by the engine itself
    (bypassing CheckpointIO); every other strategy writes one file through CheckpointIO."""
    if isinstance(strategy, DeepSpeedStrategy):
        return True
    return isinstance(strategy, ModelParallelStrategy) and getattr(strategy, "_save_distributed_checkpoint", True)


class PeriodicCheckpoint(Checkpoint):
    """Every `every_n_train_steps` optimizer steps and at the final one, the full training state to
    `<dirpath>/<filename>`, so a killed run loses at most that many steps (`ckpt_path: auto` resumes from
    it; 0 or null: only the final step).

    A file goes through the trainer's CheckpointIO (train/infra/checkpoint_io.py: a temporary file
    beside it, one rename). A directory (DeepSpeed, FSDP2) is written as `<filename>.partial` and
    swapped in (`commit`); a kill between the swap's two renames leaves the complete `.partial` and the
    previous `.old`, and resuming takes the newer usable one. At the start of training rank 0 finishes
    such a swap and removes what interrupted saves left behind (`tidy`).
    """

    def __init__(self, dirpath: str, every_n_train_steps: int | None = 200, filename: str = "last.ckpt"):
        self.last_path = Path(dirpath) / filename
        self.every_n_train_steps = int(every_n_train_steps or 0)
        self._saved_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            tidy(checkpoint_dirs(trainer))
        trainer.strategy.barrier("PeriodicCheckpoint.tidy")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # advanced by the optimizer step of this batch (once per accumulation)
        n = self.every_n_train_steps
        periodic = n > 0 and step % n == 0
        # the final step too: Lightning's ModelCheckpoint rewrites last.ckpt only when an evaluation saved a
        # new best, and a run resumed or extended (resume.extend_to) must continue from its last step
        final = step == trainer.max_steps
        if step == 0 or not (periodic or final) or step == self._saved_step or trainer.sanity_checking:
            return
        self._saved_step = step
        self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        if writes_directories(trainer.strategy):
            staged = with_suffix(self.last_path, ".partial")
            trainer.save_checkpoint(staged, weights_only=False)  # every rank writes its shards
            if trainer.is_global_zero:
                commit(staged, self.last_path)
        else:
            trainer.save_checkpoint(self.last_path, weights_only=False)
        trainer.strategy.barrier("PeriodicCheckpoint.save")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def commit(staged: Path, final: Path) -> None:
    """Put the completely written `staged` at `final`, so that `final` (or `final.old`) is always whole."""
    if staged.is_file() and not final.is_dir():
        os.replace(staged, final)
    else:
        old = with_suffix(final, ".old")
        _remove(old)
        if final.exists():
            os.replace(final, old)
        os.replace(staged, final)
        _remove(old)
    fsync_dir(final.parent)


def tidy(dirs: list[Path]) -> None:
    """Finish directory swaps a kill interrupted, and remove what interrupted saves left: temporary
    files (`.<name>.<pid>.<id>.partial`, `.export.<id>.partial`, gigabytes for a real model), incomplete
    `<name>.partial` directories and `<name>.old` copies that a complete checkpoint replaced."""
    for d in dirs:
        for staged in sorted(d.glob("*.partial")):
            final = staged.with_name(staged.name.removesuffix(".partial"))
            if not staged.name.startswith(".") and not final.exists() and checkpoint_problem(staged) is None:
                os.replace(staged, final)  # the swap had removed `final`: its staged copy is complete
                log.info("completed the interrupted save of %s", final)
            else:
                _remove(staged)
                log.info("removed %s, left by an interrupted save", staged)
        for old in sorted(d.glob("*.old")):
            final = old.with_name(old.name.removesuffix(".old"))
            if old.name.startswith(".") or (final.exists() and checkpoint_problem(final) is None):
                _remove(old)
            elif not final.exists():
                os.replace(old, final)
        fsync_dir(d)


# --- RNG state ---------------------------------------------------------------------------------------------
def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch / CUDA / Python / NumPy generator states as tensors (safe to load with
    weights_only=True, and all-gatherable)."""
    version, py_keys, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state().to(torch.int64),
        "python": torch.tensor([version, *py_keys], dtype=torch.int64),
        "numpy": torch.tensor([*np_keys.tolist(), np_pos, np_has_gauss], dtype=torch.int64),
        "gauss": torch.tensor([py_gauss is not None, py_gauss or 0.0, np_gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().to(torch.int64)
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"].to(torch.uint8))
    py = [int(v) for v in state["python"].tolist()]
    has_gauss, py_gauss, np_gauss = state["gauss"].tolist()
    random.setstate((py[0], tuple(py[1:]), py_gauss if has_gauss else None))
    keys = state["numpy"][:-2].numpy().astype(np.uint32)
    np_pos, np_has_gauss = (int(v) for v in state["numpy"][-2:].tolist())
    np.random.set_state(("MT19937", keys, np_pos, np_has_gauss, np_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8))


class RngState(L.Callback):
    """Every rank's generator states in each checkpoint, put back right before the first resumed training
    batch, so dropout and anything else drawing random numbers continue as if never interrupted."""

    KEY = "rng_states"

    def __init__(self):
        self._pending: dict[str, torch.Tensor] | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[self.KEY] = {k: gather_ranks(trainer, v) for k, v in rng_state().items()}  # [world, ...]

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        states = checkpoint.get(self.KEY)
        if not states:
            return
        saved_world = len(states["torch"])
        if saved_world != trainer.world_size:
            log.warning("RNG states were saved by %d rank(s), this run has %d: random streams restart from the seed",
                        saved_world, trainer.world_size)
            return
        self._pending = {k: v[trainer.global_rank] for k, v in states.items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:
            set_rng_state(self._pending)
            self._pending = None
