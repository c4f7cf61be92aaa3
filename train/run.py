"""The main job, `python -m train [overrides]`: build from the config, fit, evaluate the best
checkpoint, export it, report."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from .builders import CONF_DIR, RunConfig, build_data, build_module, build_trainer, register_resolvers
from .callbacks import EfficiencyMetrics
from .infra.resume import keep_csv_history, resolve_ckpt_path
from .infra.sharding import is_zero3, load_zero3_weights
from .module import MLLMModule
from .peft import export_model

log = logging.getLogger(__name__)


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    register_resolvers()  # also in launcher processes (submitit), which re-resolve the config
    summary = run(cfg)
    return summary["metrics"].get("val/acc")  # what a Hydra sweeper optimises


def run(cfg: DictConfig) -> dict:
    """Fit, evaluate the best checkpoint on the val shards, export it; returns the final metrics."""
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)
    job = RunConfig.from_config(cfg)  # every config error surfaces here, before any data work

    start = time.time()
    tokenizer, dm = build_data(job.model, job.data, cfg.paths.data_dir, cfg.seed)
    data_seconds = time.time() - start
    module = build_module(job, tokenizer)
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
        "model": job.model.name,
        "arch": job.plan.name,
        "steps": trainer.global_step,
        "flops": flops_counting(trainer),
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
    """True when fit's last evaluation ran at the final step and produced the best checkpoint: its
    metrics are the best model's, so evaluating again would only repeat the work."""
    return bool(best) and module.best_step == module.last_val_step == trainer.global_step


def flops_counting(trainer: L.Trainer) -> dict | None:
    """How eff/*flops* were counted, from the callback that counted them."""
    return next((cb.counting() for cb in trainer.callbacks if isinstance(cb, EfficiencyMetrics)), None)


def print_summary(summary: dict) -> None:
    m = summary["metrics"]
    skills = "  ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in sorted(m.items()) if k.startswith("val/acc/"))
    lines = [
        "",
        f"== {summary['model']} / {summary['arch']}: {summary['steps']} steps in {summary['seconds']['total']} s ==",
        f"val/acc {m.get('val/acc', float('nan')):.3f}   acc_noimage {m.get('val/acc_noimage', float('nan')):.3f}   "
        f"acc_majority {m.get('val/acc_majority', float('nan')):.3f}   val/loss {m.get('val/loss', float('nan')):.4f}",
        *([f"per skill: {skills}"] if skills else []),
        f"metrics:  {summary['run_dir']}/metrics.json",
        f"config:   {summary['run_dir']}/config.yaml",
    ]
    if "export" in summary:
        lines.append(f"model:    {summary['export']}  (MLLM.from_pretrained / LlavaForConditionalGeneration.from_pretrained)")
    print("\n".join(lines), flush=True)
