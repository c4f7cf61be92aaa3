"""The main job: compose objects from the config, fit, evaluate the best checkpoint, export, report."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from data.chat import TEMPLATES, ChatTokenizer
from data.datamodule import ImageSpec, MLLMDataModule, SampleEncoder

from models.methods import arch_name
from models.plan import Plan

from .checkpoint_io import AtomicCheckpointIO
from .factory import ModelSpec
from .module import MLLMModule
from .nonfinite import NonFiniteGuard
from .optim import OptimConfig
from .peft import PeftConfig, export_model
from .preemption import cluster_plugins
from .resume import keep_csv_history, resolve_ckpt_path
from .sharding import is_zero3, load_zero3_weights
from .stage import StageConfig

log = logging.getLogger(__name__)
OmegaConf.register_new_resolver("arch_name", arch_name, replace=True)  # run directories name the plan


def resolve_precision(precision):
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def build_strategy(cfg: DictConfig):
    """`name` alone selects a Lightning strategy by name; with `_target_` the rest are its arguments."""
    if "_target_" not in cfg:
        return cfg.name
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    kwargs.pop("name", None)
    return instantiate(kwargs)


def build_trainer(cfg: DictConfig) -> L.Trainer:
    loggers = [instantiate(c) for c in cfg.logger.values()] if cfg.logger else False
    callbacks = [instantiate(c) for c in cfg.callbacks.values()] if cfg.callbacks else []
    return instantiate(
        cfg.trainer,
        precision=resolve_precision(cfg.trainer.precision),
        strategy=build_strategy(cfg.strategy),
        logger=loggers,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO(), *cluster_plugins()],  # atomic saves; Slurm without Lightning's in-handler requeue
    )


def build_data(cfg: DictConfig, spec: ModelSpec):
    """Prepare shards (generating the synthetic task if needed), the tokenizer and the data module."""
    shards = instantiate(cfg.data.source).prepare()
    tokenizer = spec.load_tokenizer(shards.texts, Path(cfg.paths.data_dir) / "tokenizers")
    mcfg = spec.mllm_config
    chat = ChatTokenizer(tokenizer, spec.chat_template, mcfg.num_image_tokens, cfg.data.max_length, spec.system_prompt)
    image = ImageSpec(mcfg.hf_vision_config().image_size, mcfg.image_mean, mcfg.image_std)
    dm = MLLMDataModule(
        shards.train,
        shards.val,
        SampleEncoder(chat, image),
        pad_id=tokenizer.pad_token_id,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        seed=cfg.seed,
        group_by_length=cfg.data.group_by_length,
        group_buffer_batches=cfg.data.group_buffer_batches,
    )
    return tokenizer, dm


def stop_ids(tokenizer, template: str) -> list[int]:
    """Token ids that end a reply: the tokenizer's EOS and the template's stop marker."""
    ids = {tokenizer.eos_token_id}
    stop = TEMPLATES[template].stop.strip()
    if stop and stop in tokenizer.get_vocab():
        ids.add(tokenizer.convert_tokens_to_ids(stop))
    return sorted(i for i in ids if i is not None)


def build_module(cfg: DictConfig, spec: ModelSpec, plan: Plan, tokenizer) -> MLLMModule:
    return MLLMModule(
        model_factory=lambda: spec.build(plan),
        optim=OptimConfig.from_dict(OmegaConf.to_container(cfg.optim)),
        stage=StageConfig.from_dict(OmegaConf.to_container(cfg.stage)),
        peft=PeftConfig.from_dict(OmegaConf.to_container(cfg.peft) if "peft" in cfg else None),
        decode=lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True),
        eos_ids=stop_ids(tokenizer, spec.chat_template),
        pad_id=tokenizer.pad_token_id,
        max_new_tokens=cfg.eval.max_new_tokens,
        eval_noimage=cfg.eval.noimage,
        nonfinite=NonFiniteGuard(**cfg.get("nonfinite", {})),
    )


def run(cfg: DictConfig) -> dict:
    """Fit, evaluate the best checkpoint on the val shards, export it; returns the final metrics."""
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)
    spec = ModelSpec.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    plan = spec.plan(OmegaConf.to_container(cfg.arch, resolve=True))  # a bad plan fails before any data work

    start = time.time()
    tokenizer, dm = build_data(cfg, spec)
    data_seconds = time.time() - start
    module = build_module(cfg, spec, plan, tokenizer)
    trainer = build_trainer(cfg)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, trainer)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
        keep_csv_history(trainer)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    fit_seconds = time.time() - start - data_seconds

    best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    if not evaluated_at_end(trainer, module, best):
        if best and is_zero3(trainer.strategy):
            load_zero3_weights(module.model, best)
            best = None
        trainer.validate(module, datamodule=dm, ckpt_path=best, verbose=False, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.split("/")[0] in ("val", "eff", "perf", "train")}
    summary = {
        "run_dir": str(out_dir),
        "model": spec.name,
        "arch": plan.name,
        "steps": trainer.global_step,
        "flops": flops_convention(cfg),
        "best_checkpoint": best,
        "seconds": {"data": round(data_seconds, 1), "fit": round(fit_seconds, 1), "total": round(time.time() - start, 1)},
        "metrics": metrics,
    }
    model = module.unsharded_model() if cfg.export else None  # a collective under ZeRO-3 / FSDP
    if cfg.export and trainer.is_global_zero:
        export_dir = out_dir / "export"
        adapter_dir = export_model(model, export_dir)  # LoRA: merged weights + <run>/adapter
        if adapter_dir is not None:
            summary["adapter"] = str(adapter_dir)
        tokenizer.save_pretrained(export_dir)
        summary["export"] = str(export_dir)
    if trainer.is_global_zero:
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        print_summary(summary)
    return summary


def evaluated_at_end(trainer: L.Trainer, module: MLLMModule, best: str | None) -> bool:
    """True when fit's last evaluation ran at the final step and that step is the best checkpoint:
    its metrics are the best model's, so evaluating again would only repeat the work."""
    match = re.search(r"step(\d+)", Path(best).stem) if best else None
    return bool(match) and int(match.group(1)) == trainer.global_step == module.last_val_step


def flops_convention(cfg: DictConfig) -> dict | None:
    """How eff/*flops* were counted (recorded beside them)."""
    eff = (cfg.callbacks or {}).get("efficiency")
    if not eff:
        return None
    return {"convention": eff.convention, "scope": eff.scope, "per": "sample, prefill, decoder layers"}


def print_summary(summary: dict) -> None:
    m = summary["metrics"]
    lines = [
        "",
        f"== {summary['model']} / {summary['arch']}: {summary['steps']} steps in {summary['seconds']['total']} s ==",
        f"val/acc {m.get('val/acc', float('nan')):.3f}   acc_noimage {m.get('val/acc_noimage', float('nan')):.3f}   "
        f"acc_majority {m.get('val/acc_majority', float('nan')):.3f}   val/loss {m.get('val/loss', float('nan')):.4f}",
        "per skill: " + "  ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in sorted(m.items()) if k.startswith("val/acc/")),
        f"metrics:  {summary['run_dir']}/metrics.json",
        f"config:   {summary['run_dir']}/config.yaml",
    ]
    if "export" in summary:
        lines.append(f"model:    {summary['export']}  (MLLM.from_pretrained / LlavaForConditionalGeneration.from_pretrained)")
    print("\n".join(lines), flush=True)
