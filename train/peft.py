"""The `peft` config group: LoRA (or QLoRA) on the language model only.

LoRA targets the LLM's projections by module path (`language_model.layers.N.*.<name>`): the vision
tower has `q_proj/k_proj/v_proj` too, and a bare name list would adapt it as well. Under LoRA the
base LLM, its embeddings and `lm_head` are frozen (unless `train_embeddings` / `train_lm_head`);
the projector, the vision tower and gated cross-attention blocks follow the stage as usual. peft's
layers wrap the HF modules in place, so `MLLM`'s own forward and module names stay as they are.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from models.config import ConfigError, check_types
from models.gathered import gathered, numel, zero_init_active
from models.lora import is_lora, merged_state_dict, save_adapter

from .stage import StageConfig, apply_stage

log = logging.getLogger(__name__)
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_NAMES = ("none", "lora", "qlora")


@dataclass
class PeftConfig:
    """`name`: none | lora | qlora (4-bit NF4 base LLM via bitsandbytes, CUDA only)."""

    name: str = "none"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_PROJECTIONS))
    train_lm_head: bool = False
    train_embeddings: bool = False

    def __post_init__(self) -> None:
        check_types(self, "peft")
        if self.name not in PEFT_NAMES:
            raise ConfigError(f"peft.name must be one of {list(PEFT_NAMES)}, got {self.name!r}")
        if self.enabled:
            if not (self.r > 0 and self.alpha > 0 and 0 <= self.dropout < 1):
                raise ConfigError(f"invalid LoRA settings r={self.r}, alpha={self.alpha}, dropout={self.dropout}: need r > 0, alpha > 0, 0 <= dropout < 1")
            if not self.target_modules or not all(re.fullmatch(r"\w+", t) for t in self.target_modules):
                raise ConfigError(f"peft.target_modules must be non-empty module names such as {LLAMA_PROJECTIONS}, got {self.target_modules}")
        if self.name == "qlora":
            require_qlora_support()  # at config time, before any data or model work

    @property
    def enabled(self) -> bool:
        return self.name != "none"

    def target_regex(self) -> str:
        """Full-match pattern for LLM layer projections only (never the vision tower or xattn)."""
        names = "|".join(map(re.escape, self.target_modules))
        return rf"language_model\.layers\.\d+\.(?:[\w.]+\.)?(?:{names})"


def require_qlora_support() -> None:
    """QLoRA stores the base LLM in 4-bit NF4 through bitsandbytes, which needs a CUDA GPU."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("peft=qlora needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU; on CPU use peft=lora")
    if not torch.cuda.is_available():
        raise ConfigError("peft=qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); on CPU use peft=lora")


def quantize_llm(model: nn.Module, targets: str) -> None:
    """Replace the targeted LLM linears with bitsandbytes 4-bit NF4 linears on the current GPU."""
    import bitsandbytes as bnb

    compute = model.dtype if model.dtype != torch.float32 else torch.bfloat16
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and re.fullmatch(targets, name):
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, module.bias is not None, compute_dtype=compute, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(module.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            if module.bias is not None:
                q.bias = nn.Parameter(module.bias.data.cpu(), requires_grad=False)
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, q.cuda())  # moving to CUDA quantizes


def inject_lora(model: nn.Module, cfg: PeftConfig) -> None:
    """Wrap the targeted LLM projections of `model` (an `MLLM`) in peft LoRA layers, in place."""
    from peft import LoraConfig, inject_adapter_in_model

    if cfg.name == "qlora":
        require_qlora_support()
        quantize_llm(model, cfg.target_regex())
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_regex(), bias="none")
    inject_adapter_in_model(lora, model)
    if zero_init_active():  # built partitioned: peft's init wrote into empty shards; B must start at zero
        for m in (m for m in model.modules() if is_lora(m)):
            with gathered([*m.lora_A.parameters(), *m.lora_B.parameters()]):
                m.reset_lora_parameters("default", init_lora_weights=True)
    found = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if is_lora(m)}
    if set(cfg.target_modules) - found:
        raise ConfigError(
            f"peft.target_modules {sorted(set(cfg.target_modules) - found)} match no layer of the language model; "
            f"its decoder layers have {sorted(_linear_names(model))}"
        )


def _linear_names(model: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.language_model.layers.named_modules() if isinstance(m, nn.Linear)}


def trainable_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per part; `llm_lora` counts adapter weights, `llm` the rest of the LLM."""
    counts = {"vision_tower": 0, "projector": 0, "llm": 0, "llm_lora": 0, "lm_head": 0, "xattn": 0, "routers": 0}
    part = {"vision_tower": "vision_tower", "multi_modal_projector": "projector", "image_newline": "projector", "language_model": "llm",
            "lm_head": "lm_head", "xattn": "xattn", "routers": "routers"}
    for name, p in model.named_parameters():  # shared (tied) parameters are listed once
        if p.requires_grad:
            key = part.get(name.split(".", 1)[0], "other")
            if key == "llm" and ".lora_" in name:
                key = "llm_lora"
            counts[key] = counts.get(key, 0) + numel(p)
    return counts


def apply_training_setup(model: nn.Module, stage: StageConfig, cfg: PeftConfig) -> dict[str, int]:
    """The stage's freezing, with the LLM learning through LoRA only when `cfg` enables it.
    Returns (and logs) the trainable parameter counts per part."""
    if cfg.enabled:
        if not stage.train_llm:
            raise ConfigError(
                f"peft={cfg.name} adapts the LLM, but stage={stage.name} freezes it (stage.train_llm=false); "
                "use stage=finetune (or scratch), or peft=none"
            )
        inject_lora(model, cfg)
    apply_stage(model, stage)
    if cfg.enabled:
        for name, p in model.language_model.named_parameters():
            p.requires_grad_(".lora_" in name)
        model.lm_head.requires_grad_(cfg.train_lm_head)
        model.xattn.requires_grad_(True)  # new blocks always train fully (peft's injection froze them)
        model.routers.requires_grad_(True)  # and so do a routed plan's routers
        if cfg.train_embeddings:
            model.language_model.embed_tokens.requires_grad_(True)
    counts = trainable_counts(model)
    total = sum(numel(p) for p in model.parameters())
    log.info("peft %s / stage %s: trainable %s of %d parameters (%s)", cfg.name, stage.name, sum(counts.values()), total, counts)
    return counts


def trainable_prefixes(model: nn.Module) -> list[str]:
    """Top-level parts (and the LLM's embeddings) with trainable non-LoRA weights: saved beside the adapter."""
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad and ".lora_" not in name:
            head = name.split(".", 1)[0]
            prefix = "language_model.embed_tokens." if name.startswith("language_model.embed_tokens.") else head + "." if "." in name else name
            if prefix not in out:
                out.append(prefix)
    return out


def export_model(model: nn.Module, export_dir: Path) -> Path | None:
    """`save_pretrained` to `export_dir`; with LoRA the export holds merged plain weights (loads with
    `MLLM.from_pretrained`) and the adapter goes to `<export_dir's parent>/adapter`, which it returns."""
    if not any(is_lora(m) for m in model.modules()):
        model.save_pretrained(export_dir)
        return None
    adapter = save_adapter(model, Path(export_dir).parent / "adapter", trainable_prefixes(model))
    model.save_pretrained(export_dir, state_dict=merged_state_dict(model))
    return adapter
