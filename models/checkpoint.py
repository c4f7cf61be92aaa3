"""`from_pretrained` / `save_pretrained` in the llava-hf layout (safetensors, HF weight names).

We write the names llava-hf checkpoints on the Hub use (`language_model.model.*`,
`language_model.lm_head.*`, `vision_tower.vision_model.*`, `multi_modal_projector.*`), which every
transformers version loads into `LlavaForConditionalGeneration`; on load we accept those, the
transformers-v5 in-memory names (`model.language_model.*`, ...) and the v5 flattened vision names.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file
from torch import nn
from transformers.initialization import no_init_weights

from .config import MLLMConfig
from .gathered import load_state_dict
from .plan import Plan

# (ours, on disk) prefix pairs; order matters for the first match on load.
_SAVE_PREFIXES = [
    ("vision_tower.", "vision_tower.vision_model."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
]
_LOAD_PREFIXES = [
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.vision_model.", "vision_tower."),
]


def to_internal_name(key: str) -> str:
    """Map any llava-hf / transformers-v5 weight name to our module names."""
    if key.startswith("model."):
        key = key[len("model.") :]
    for src, dst in _LOAD_PREFIXES:
        if key.startswith(src):
            return dst + key[len(src) :]
    return key


def to_hub_name(key: str) -> str:
    for ours, hub in _SAVE_PREFIXES:
        if key.startswith(ours):
            return hub + key[len(ours) :]
    return key  # our own extra modules (e.g. gated cross-attention blocks) keep their names


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single or sharded safetensors, or torch .bin files)."""
    path = Path(path)
    for index_name, loader in (("model.safetensors.index.json", load_file), ("pytorch_model.bin.index.json", _load_bin)):
        index = path / index_name
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            out: dict[str, torch.Tensor] = {}
            for f in files:
                out.update(loader(str(path / f)))
            return out
    if (path / "model.safetensors").exists():
        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").exists():
        return _load_bin(str(path / "pytorch_model.bin"))
    raise FileNotFoundError(f"no weights in {path}: expected model.safetensors(.index.json) or pytorch_model.bin")


def _load_bin(file: str) -> dict[str, torch.Tensor]:
    return torch.load(file, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects


def _require_dir(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{what} {str(path)!r} is not a checkpoint directory (no config.json there). Point it at a "
            "directory written by save_pretrained / a llava-hf download, or leave it null to build from config."
        )
    return path


def build(config: MLLMConfig, dtype: torch.dtype | None = None, init: bool = True, plan=None) -> nn.Module:
    """Construct an MLLM; `init=False` skips random initialisation (weights are loaded next)."""
    from .mllm import MLLM

    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        if init:
            return MLLM(config, plan)
        with no_init_weights():
            return MLLM(config, plan)
    finally:
        torch.set_default_dtype(previous)


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str, strict: bool = True) -> None:
    """Load HF-named tensors into `model`, naming what is missing or unexpected."""
    state_dict = {to_internal_name(k): v for k, v in state_dict.items()}
    # SigLIP checkpoints may carry the pooling head, which LLaVA-style models never use
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("vision_tower.head.")}
    if model.config.hf_text_config().tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
    missing, unexpected = load_state_dict(model, state_dict)  # gathers ZeRO-3-partitioned weights
    missing = [k for k in missing if not (k == "lm_head.weight" and model.lm_head.weight is model.language_model.embed_tokens.weight)]
    if strict and (missing or unexpected):
        raise ValueError(
            f"weights in {source} do not fit the model: missing {missing[:10]}{'...' if len(missing) > 10 else ''} "
            f"({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)}). "
            "Check that model.* matches the checkpoint (vision/text family, sizes, projector)."
        )


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a llava-format directory (a llava-hf checkpoint or one of our exports)."""
    path = _require_dir(path, "model.pretrained")
    hf = json.loads((path / "config.json").read_text())
    if hf.get("model_type") != "llava":
        raise ValueError(
            f"{path}/config.json has model_type {hf.get('model_type')!r}, not 'llava'. For separate vision "
            "and language checkpoints set model.vision_pretrained and model.llm_pretrained instead."
        )
    config = MLLMConfig.from_hf(hf)
    plan_dict = hf.get("efficient_mllm", {}).get("plan")
    model = build(config, dtype=dtype, init=False, plan=Plan.from_dict(plan_dict) if plan_dict else None)
    load_weights(model, read_state_dict(path), str(path))
    return model


def load_components(config: MLLMConfig, vision_path=None, llm_path=None, dtype: torch.dtype | None = None) -> nn.Module:
    """Build from config, then take the vision tower and/or LLM from their own HF directories.

    The projector (and any LLM part not given) stays randomly initialised: this is how LLaVA's
    stage-1 pretraining starts (CLIP + Vicuna + a new projector).
    """
    from transformers import AutoConfig

    vision, text = dict(config.vision), dict(config.text)
    if vision_path:
        vcfg = AutoConfig.from_pretrained(_require_dir(vision_path, "model.vision_pretrained"))
        vcfg = getattr(vcfg, "vision_config", vcfg)  # a full CLIP/SigLIP dir holds text + vision
        vision = {"model_type": vcfg.model_type, **_shape_fields(vcfg, vision)}
    if llm_path:
        tcfg = AutoConfig.from_pretrained(_require_dir(llm_path, "model.llm_pretrained"))
        text = {"model_type": tcfg.model_type, **_shape_fields(tcfg, text)}
    config = MLLMConfig(**{**config.__dict__, "vision": vision, "text": text})
    model = build(config, dtype=dtype, init=True)
    if vision_path:
        sd = read_state_dict(vision_path)
        sd = {k.split("vision_model.", 1)[1]: v for k, v in sd.items() if "vision_model." in k} or sd
        _load_part(model.vision_tower, sd, str(vision_path))
    if llm_path:
        sd = read_state_dict(llm_path)
        lm = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
        _load_part(model.language_model, lm, str(llm_path))
        head = sd.get("lm_head.weight")
        if head is not None and model.lm_head.weight is not model.language_model.embed_tokens.weight:
            load_state_dict(model.lm_head, {"weight": head})
    return model


def _shape_fields(hf_cfg, preset: dict) -> dict:
    """The checkpoint's values for every field our config knows, so shapes come from the checkpoint."""
    d = hf_cfg.to_dict()
    from .config import _known_fields

    return {k: v for k, v in _known_fields({**d, "model_type": hf_cfg.model_type}).items() if k != "model_type"}


def _load_part(module: nn.Module, sd: dict, source: str) -> None:
    missing, _ = load_state_dict(module, sd)
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} weights the model needs, e.g. {missing[:5]}")


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """`t` as a tensor that owns exactly its storage: safetensors refuses views into larger buffers,
    such as the flat parameter buffers DeepSpeed ZeRO builds."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def save_pretrained(model: nn.Module, path: str | Path, max_shard_size: str = "5GB", state_dict: dict | None = None) -> Path:
    """Write config.json + safetensors atomically: a crash mid-save never leaves a partial directory.
    `state_dict` replaces `model.state_dict()` (e.g. LoRA merged into plain weights: models.lora)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {to_hub_name(k): _own_storage(v.detach().cpu()) for k, v in (state_dict or model.state_dict()).items()}
        if model.lm_head.weight is model.language_model.embed_tokens.weight:
            state.pop("language_model.lm_head.weight", None)
        save_torch_state_dict(state, tmp, max_shard_size=max_shard_size)
        hf = model.config.to_hf_dict()
        hf["efficient_mllm"]["plan"] = model.plan.to_dict()
        hf["architectures"] = ["LlavaForConditionalGeneration"]
        hf["dtype"] = str(model.dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
        if path.exists():
            old = path.with_name(path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
