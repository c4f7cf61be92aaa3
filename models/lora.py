"""LoRA seen through weights: the decoder reads weight rows/columns directly where a plan keeps only
some heads or FFN neurons for visual tokens, so those reads must see the adapted weight
W + scale * B @ A, not the frozen base W that a peft layer's `.weight` returns.

Also: the merged state dict (for an export that plain `MLLM.from_pretrained` loads), and the
adapter / trainable-weight files that let a run save only what it trained.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TRAINABLE_FILE = "trainable.safetensors"  # trained non-LoRA weights (projector, xattn, ...)


def is_lora(module: nn.Module) -> bool:
    """A peft LoRA layer (without importing peft when nobody uses it)."""
    return hasattr(module, "lora_A") and hasattr(module, "get_base_layer")


def _base_weight(base: nn.Module) -> Tensor:
    if isinstance(base.weight, nn.Parameter) and type(base.weight).__name__ in ("Params4bit", "Int8Params"):
        from peft.utils.integrations import dequantize_module_weight  # QLoRA: bitsandbytes base

        return dequantize_module_weight(base)
    return base.weight


def lora_delta(layer: nn.Module) -> Tensor | None:
    """Sum of the active adapters' scale * B @ A (None when they are off or merged into W)."""
    if layer.disable_adapters or layer.merged:
        return None
    delta = None
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if name in getattr(layer, "lora_variant", {}):
            raise NotImplementedError(
                f"LoRA variant {type(layer.lora_variant[name]).__name__} (e.g. DoRA) is not supported on the decoder's "
                "head/neuron-subset paths, which read weights directly; use plain LoRA (peft.use_dora=false)"
            )
        d = layer.get_delta_weight(name)
        delta = d if delta is None else delta + d
    return delta


def linear_weight(linear: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The effective (weight, bias) of a plain `nn.Linear` or a peft LoRA Linear (differentiable in
    A and B). LoRA dropout acts on inputs, so it does not apply on paths that read this weight."""
    if not is_lora(linear):
        return linear.weight, linear.bias
    base = linear.get_base_layer()
    w = _base_weight(base)
    delta = lora_delta(linear)
    if delta is not None:
        w = w + delta.to(w.dtype)
    return w, base.bias


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """`model.state_dict()` as if every LoRA layer were a plain Linear with its adapters merged
    (on CPU, detached): the names and values a model without peft would have."""
    lora_layers = {name: m for name, m in model.named_modules() if is_lora(m)}
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        owner = next((n for n in lora_layers if key.startswith(n + ".")), None)
        if owner is None:
            out[key] = value.detach().cpu()
            continue
        rest = key[len(owner) + 1 :]
        if rest == "base_layer.weight":
            with torch.no_grad():
                w, _ = linear_weight(lora_layers[owner])  # dequantized under QLoRA
            out[f"{owner}.weight"] = w.detach().cpu().to(value.dtype if value.is_floating_point() else w.dtype)
        elif rest == "base_layer.bias":
            out[f"{owner}.bias"] = value.detach().cpu()
        # else: lora_A / lora_B weights and quantization state (absmax, quant_map, ...)
    return out


def save_adapter(model: nn.Module, path: str | Path, trainable_prefixes: list[str]) -> Path:
    """peft-format adapter (adapter_config.json + adapter_model.safetensors) plus the trained
    non-LoRA weights whose names start with `trainable_prefixes` in `trainable.safetensors`."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.peft_config["default"]
    config.save_pretrained(str(path))
    adapter = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(adapter, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    extra = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k.startswith(tuple(trainable_prefixes))}
    save_file(extra, str(path / TRAINABLE_FILE), metadata={"format": "pt"})
    return path


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Inject the adapter saved by `save_adapter` into `model` (an `MLLM` of the base weights) and
    load its LoRA and trained non-LoRA weights. Returns `model` (changed in place)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    missing = [f for f in (*ADAPTER_FILES, TRAINABLE_FILE) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not an adapter directory written by save_adapter: missing {missing}")
    config = LoraConfig.from_pretrained(str(path))
    inject_adapter_in_model(config, model)
    result = set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"adapter in {path} has weights the model lacks: {result.unexpected_keys[:5]}")
    extra = load_file(str(path / TRAINABLE_FILE))
    unexpected = model.load_state_dict(extra, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{path}/{TRAINABLE_FILE} has weights the model lacks: {unexpected[:5]}")
    return model
