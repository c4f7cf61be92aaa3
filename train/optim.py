"""AdamW with LLaVA-style parameter groups and a warmup + cosine schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from models.config import ConfigError, check_types


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03  # of the schedule's length (LLaVA recipes: 0.03)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    # Length of the warmup + cosine schedule when longer than the run (else, and when None: the run's
    # trainer.max_steps). The run then ends at a learning rate still above the floor, as nanoGPT's
    # lr_decay_iters can: its steps are exactly the first steps of a decay_steps-long run.
    decay_steps: int | None = None
    projector_lr: float | None = None  # the projector's own learning rate (LLaVA-1.5's LoRA recipe: 2e-5)
    router_lr: float | None = None  # routed plans' routers (models/routing.py); null: lr (p-MoD trains them at its recipe's 2e-5)

    def __post_init__(self) -> None:
        check_types(self, "optim")
        self.betas = tuple(self.betas)
        for name, ok, need in (
            ("lr", self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("betas", all(0 <= b < 1 for b in self.betas), "two values in [0, 1)"),
            ("eps", self.eps > 0, "> 0"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "in [0, 1)"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("decay_steps", self.decay_steps is None or self.decay_steps >= 1, ">= 1, or null (the run's length)"),
            ("projector_lr", self.projector_lr is None or self.projector_lr > 0, "> 0, or null (optim.lr)"),
            ("router_lr", self.router_lr is None or self.router_lr > 0, "> 0, or null (optim.lr)"),
        ):
            if not ok:
                raise ConfigError(f"optim.{name} must be {need}, got {getattr(self, name)}")


def param_groups(model: nn.Module, weight_decay: float, projector_lr: float | None = None, router_lr: float | None = None) -> list[dict]:
    """Trainable parameters, with no weight decay on biases and norm weights (all 1-D tensors); with
    `projector_lr`, the projector's parameters in groups of their own at that learning rate (LLaVA's
    `mm_projector_lr`). Routers (routed plans) are a group of their own, without weight decay (p-MoD),
    at `router_lr` (None: the optimizer's lr)."""
    projector = set()
    if projector_lr is not None:
        projector = {id(p) for p in [*model.multi_modal_projector.parameters(), *model.family.projector_extras(model)]}
    groups = []
    for own_lr in (False, True):
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad and (id(p) in projector) == own_lr:
                ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitions keep the full shape there
                (no_decay if ndim < 2 else decay).append(p)
        extra = {"lr": projector_lr} if own_lr else {}
        groups += [{"params": decay, "weight_decay": weight_decay, **extra}, {"params": no_decay, "weight_decay": 0.0, **extra}]
    routers = [p for p in model.routers.parameters() if p.requires_grad] if hasattr(model, "routers") else []
    if routers:
        ids = {id(p) for p in routers}
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) not in ids]
        groups.append({"params": routers, "weight_decay": 0.0, **({"lr": router_lr} if router_lr is not None else {})})
    return [g for g in groups if g["params"]]


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `total` steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: OptimConfig, total_steps: int, cpu_offload: bool = False):
    """`total_steps`: the run's length (the schedule's too, unless `cfg.decay_steps` is longer).
    `cpu_offload`: the optimizer states live in CPU memory (ZeRO-Offload), where DeepSpeed's
    vectorised CPU Adam (compiled on first use) replaces torch's AdamW."""
    groups = param_groups(model, cfg.weight_decay, cfg.projector_lr, cfg.router_lr)
    if not groups:
        raise ValueError("no trainable parameters: check the stage (stage.train_*) and PEFT settings")
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, adamw_mode=True)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    length = max(total_steps, cfg.decay_steps or 0)
    warmup = int(cfg.warmup_ratio * length)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, length, warmup, cfg.min_lr_ratio))
    return opt, sched
