"""Checkpoint directories on disk: safetensors I/O, shape checks and atomic writes.

The names on disk are the family's (each family's state-dict adapter, `Family.to_hub_name` /
`to_internal_name` in `models/families/`, maps HF weight names to our modules and back).
Construction lives in `models.mllm.MLLM` (`from_config` / `from_pretrained` / `from_components`);
this module never builds a model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from .gathered import load_state_dict

log = logging.getLogger(__name__)
# huggingface_hub names this logger by its file path; it is the logger of the module defining the function
HF_SAVE_LOGGER = getattr(sys.modules[save_torch_state_dict.__module__], "logger", logging.getLogger("huggingface_hub"))

SAFETENSORS_INDEX = "model.safetensors.index.json"
PREPROCESSOR_FILE = "preprocessor_config.json"


def checkpoint_dir(path: str | Path, what: str) -> Path:
    """`path` as a checkpoint directory (one with config.json), or a message saying what to point at."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{what} {str(path)!r} is not a checkpoint directory (no config.json there). Point it at a "
            "directory written by save_pretrained / a llava-hf download, or leave it null to build from config."
        )
    return path


def read_config(path: str | Path, what: str = "model.pretrained") -> dict:
    return json.loads((checkpoint_dir(path, what) / "config.json").read_text())


def read_preprocessor(path: str | Path) -> dict | None:
    """The directory's preprocessor_config.json (its image processor's settings), or None."""
    file = Path(path) / PREPROCESSOR_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def weight_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory (single or sharded safetensors, or torch .bin)."""
    path = Path(path)
    for index_name in (SAFETENSORS_INDEX, "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return [path / name]
    raise FileNotFoundError(f"no weights in {path}: expected model.safetensors(.index.json) or pytorch_model.bin")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, under their on-disk names."""
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        if f.suffix == ".safetensors":
            out.update(load_file(str(f)))
        else:
            out.update(torch.load(f, map_location="cpu", weights_only=True))  # never unpickle arbitrary objects
    return out


def read_shapes(path: str | Path) -> dict[str, tuple[int, ...]] | None:
    """Tensor names and shapes from safetensors headers, without reading any tensor data (None for
    torch .bin checkpoints, whose shapes are only known after loading)."""
    shapes = {}
    for f in weight_files(path):
        if f.suffix != ".safetensors":
            return None
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                shapes[k] = tuple(st.get_slice(k).get_shape())
    return shapes


def checkpoint_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """On-disk tensors renamed to `model`'s names (its family's adapter): tensors the model never
    uses (e.g. SigLIP's pooling head) and a tied lm_head copy are dropped."""
    family = model.family
    state = {family.to_internal_name(k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not family.dropped_on_load(k)}
    if _tied(model):
        state.pop("lm_head.weight", None)
    return state


def mismatches(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrong shape) names between `model` and on-disk tensor `shapes`."""
    ours = {k: tuple(getattr(v, "ds_shape", v.shape)) for k, v in model.state_dict(keep_vars=True).items()}  # ZeRO-3: full shape
    if _tied(model):
        ours.pop("lm_head.weight", None)
    theirs = checkpoint_state(shapes, model)
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    wrong = [f"{k} {list(theirs[k])} vs {list(ours[k])}" for k in ours if k in theirs and tuple(theirs[k]) != ours[k]]
    return missing, unexpected, wrong


def mismatch_message(source: str, missing: list[str], unexpected: list[str], wrong: list[str]) -> str | None:
    if not (missing or unexpected or wrong):
        return None
    parts = []
    for what, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape (checkpoint vs model)", wrong)):
        if names:
            parts.append(f"{what} ({len(names)}): {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}")
    return (
        f"the weights in {source} do not fit the model built from its config: " + "; ".join(parts)
        + ". Check that model.* matches the checkpoint (vision/text family, sizes, projector)."
    )


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str, strict: bool = True) -> None:
    """Load on-disk tensors into `model` (ZeRO-3 partitions included), naming what does not fit."""
    state = checkpoint_state(state, model)
    if strict:
        message = mismatch_message(source, *mismatches(model, {k: tuple(v.shape) for k, v in state.items()}))
        if message:
            raise ValueError(message)
    load_state_dict(model, state)


def _tied(model: nn.Module) -> bool:
    return model.lm_head.weight is model.language_model.embed_tokens.weight


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """`t` as a tensor that owns exactly its storage: safetensors refuses views into larger buffers,
    such as the flat parameter buffers DeepSpeed ZeRO builds."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def hub_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """`state` (default: the model's) on CPU under the family's Hub names, a tied lm_head left out."""
    state = dict(state or model.state_dict())
    if _tied(model):
        state.pop("lm_head.weight", None)
    return {model.family.to_hub_name(k): _own_storage(v.detach().cpu()) for k, v in state.items()}


def write_checkpoint(path: str | Path, state: dict[str, torch.Tensor], config: dict, max_shard_size: str = "5GB") -> Path:
    """Write config.json + safetensors into `path` so that it is never seen half-written: the files
    go to a hidden sibling directory that replaces `path` by rename. Permissions follow the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    tmp.mkdir()  # mode 0o777 minus the umask, like any directory the user creates (mkdtemp would force 0700)
    try:
        with quiet(HF_SAVE_LOGGER):  # its "successfully saved to" names `tmp`, gone after the rename
            save_torch_state_dict(state, tmp, max_shard_size=max_shard_size)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        file_mode = tmp.stat().st_mode & 0o666  # 0o666 minus the umask (safetensors creates its files 0600)
        for f in tmp.iterdir():
            f.chmod(file_mode)
        if path.exists():
            old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("model weights saved to %s", path)
    return path


@contextmanager
def quiet(logger: logging.Logger, level: int = logging.WARNING):
    """Hide `logger`'s messages below `level` for the duration."""
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)
