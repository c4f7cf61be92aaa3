"""Training stages: which parts of the MLLM learn (LLaVA stage 1 / stage 2, or everything)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from models.config import check_types
from models.gathered import numel

log = logging.getLogger(__name__)


@dataclass
class StageConfig:
    """`pretrain`: projector only (LLaVA stage 1). `finetune`: projector + LLM, vision tower frozen
    unless `train_vision` (LLaVA stage 2). `scratch`: everything (models built from configs)."""

    name: str
    train_vision: bool
    train_projector: bool
    train_llm: bool

    def __post_init__(self) -> None:
        check_types(self, "stage")


def unused_vision_modules(model: nn.Module) -> list[nn.Module]:
    """Tower modules whose output never reaches the LLM (LLaVA reads an earlier layer), per family."""
    return model.family.unused_vision_modules(model)


def apply_stage(model: nn.Module, stage: StageConfig) -> dict[str, int]:
    """Set `requires_grad` per part and return trainable parameter counts per part."""
    parts = {
        "vision_tower": (model.vision_tower, stage.train_vision),
        "projector": (model.multi_modal_projector, stage.train_projector),
        "llm": (model.language_model, stage.train_llm),
        "lm_head": (model.lm_head, stage.train_llm),
    }
    counts = {}
    for name, (module, trainable) in parts.items():
        module.requires_grad_(trainable)
    for module in unused_vision_modules(model):  # never reach the LLM: no gradient, and DDP would complain
        module.requires_grad_(False)
    for param in model.family.projector_extras(model):  # e.g. LLaVA-NeXT's image_newline: trains with the projector
        param.requires_grad_(stage.train_projector)
    model.routers.requires_grad_(stage.train_llm)  # a routed plan's routers (models/routing.py) train with the LLM
    for name, (module, _) in parts.items():
        counts[name] = sum(numel(p) for p in module.parameters() if p.requires_grad)
    counts["projector"] += sum(numel(p) for p in model.family.projector_extras(model) if p.requires_grad)
    counts["routers"] = sum(numel(p) for p in model.routers.parameters() if p.requires_grad)
    log.info("stage %s: trainable parameters %s", stage.name, counts)
    return counts
