"""The main job, `python -m train [overrides]`: build from the config, fit, evaluate the best
checkpoint, export it, report. `python -m train evaluate` is the same job with conf/evaluate.yaml:
no training, a trained model evaluated under any plan."""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

import hydra
import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from models.checkpoint import read_shapes
from models.config import ConfigError
from models.plan import Plan

from .builders import CONF_DIR, RunConfig, build, build_data, build_module, build_trainer, register_resolvers
from .errors import exit_on_input_error, input_error, mark_job_started
from .infra.preemption import exit_when_stopped_by_signal
from .infra.resume import keep_csv_history, read_record, resolve_ckpt_path
from .infra.same_run import ResumeOptions, RunRecord, finished_summary
from .infra.sharding import is_zero3, load_zero3_weights
from .lmms.export import write_eval_files
from .model_source import ModelSource
from .module import MLLMModule
from .peft import export_model
from .report import flops_counting, logged_metrics, print_finished, write_report

log = logging.getLogger(__name__)


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    register_resolvers()  # also in launcher processes (submitit), which re-resolve the config
    mark_job_started()
    with exit_on_input_error(enabled=not in_sweep()):  # bad input: one paragraph, exit 2 (train/errors.py)
        try:
            summary = run(cfg)
        except Exception as e:  # the run directory keeps why (a sweep job's error is otherwise only in a pickle)
            if in_sweep() or input_error(e) is None:  # a refused command leaves a run directory as it was
                Path(cfg.paths.output_dir, "error.txt").write_text(traceback.format_exc())
            raise
    return summary["metrics"].get("val/acc")  # what a Hydra sweeper optimises


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run(cfg: DictConfig) -> dict:
    """Fit, evaluate the best checkpoint on the val shards and export it; with `trainer.max_steps=0`
    only evaluate `model.pretrained` under the plan (`python -m train evaluate`). Returns the report.
    A run directory that already holds this run's final report is left alone (train/infra/same_run.py)."""
    started = time.time()
    out_dir = Path(cfg.paths.output_dir)
    resume = build(cfg.resume, "resume") if "resume" in cfg else ResumeOptions()
    evaluate_only = cfg.trainer.max_steps == 0
    if resume.extend_to and evaluate_only:
        raise ConfigError("resume.extend_to continues a training run; `python -m train evaluate` does not train")
    if resume.extend_to:
        cfg.trainer.max_steps = resume.extend_to
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:  # `???` in a recipe or group: a value the command line must give
        raise ConfigError(f"missing mandatory value(s): {', '.join(missing)}; set them on the command line "
                          f"(e.g. {missing[0]}=...), see the recipe's comments for what each one is")
    config = OmegaConf.to_container(cfg, resolve=True)
    if not evaluate_only and cfg.ckpt_path in ("auto", "last"):
        finished = finished_summary(out_dir, config, cfg.trainer.max_steps)
        if finished is not None:
            if rank_zero_only.rank == 0:
                print_finished(finished)
            return finished
    L.seed_everything(cfg.seed, workers=True)
    job = RunConfig.from_config(cfg)  # every config error surfaces here, before any data work
    if evaluate_only:
        check_evaluable(job.model, job.plan)
    record = RunRecord(config, started, resume.allow_changes, ignore=("trainer.max_steps",) if resume.extend_to else ())
    trainer = build_trainer(cfg, extra_callbacks=[record])
    ckpt_path = None if evaluate_only else resolve_ckpt_path(cfg.ckpt_path, trainer)
    if ckpt_path and (saved := read_record(ckpt_path)) is not None:
        record.resumed(saved, ckpt_path)  # a changed experiment is refused before any data work
    # the run directory changes only now that the run is going ahead
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    keep_csv_history(trainer)  # whenever this run directory is used again

    start = time.time()
    tokenizer, dm = build_data(job.model, job.data, cfg.paths.data_dir, cfg.seed)
    data_seconds = time.time() - start
    module = build_module(job, tokenizer)
    with exit_when_stopped_by_signal(trainer):  # SIGTERM: checkpoint saved, exit 143 (train/infra/preemption.py)
        if evaluate_only:
            trainer.validate(module, datamodule=dm, verbose=False)
            best, fit_metrics = None, {}
        else:
            best, fit_metrics = fit_and_evaluate(trainer, module, dm, ckpt_path)
    bench = benchmark_scores(job, module, trainer) if job.evaluation.lmms_tasks else {}
    summary = {
        "run_dir": str(out_dir),
        "model": job.model.name,
        "arch": job.plan.name,
        "steps": trainer.global_step,
        "checkpoint": job.model.pretrained,
        "flops": flops_counting(trainer),
        "best_checkpoint": best,
        "seconds": {"data": round(data_seconds, 1), "fit": round(time.time() - start - data_seconds, 1)},
        "metrics": {**fit_metrics, **logged_metrics(trainer), **bench},  # the final evaluation's over fit's last values
    }
    if module.model.family.mrope:  # which M-RoPE rule placed the tokens (docs/video.md#m-rope-after-a-video)
        summary["mrope_rule"] = module.model.config.mrope_rule
    model = module.unsharded_model() if cfg.export and not evaluate_only else None  # a collective under ZeRO-3 / FSDP
    if model is not None and trainer.is_global_zero:
        export_dir = out_dir / "export"
        adapter_dir = export_model(model, export_dir)  # LoRA: merged weights + <run>/adapter
        if adapter_dir is not None:
            summary["adapter"] = str(adapter_dir)
        tokenizer.save_pretrained(export_dir)
        write_eval_files(export_dir, job.model.chat_template, job.model.system_prompt, tokenizer)  # prompts + preprocessing
        summary["export"] = str(export_dir)
        summary["export_class"] = model.family.hf_architecture  # what transformers (or the original code) loads it with
        summary["export_layout"] = "original" if model.family.original_layout else "transformers"  # models/original_layout.py
        if model.plan_modules:  # transformers would drop them (unexpected weights) and run another model
            summary["export_class"] = None
            summary["export_note"] = (f"MLLM.from_pretrained only: transformers' {model.family.hf_architecture} has no "
                                      f"{' or '.join(model.plan_modules)} and would run without them")
    this_attempt = round(record.seconds(), 1)
    summary["seconds"].update(total=this_attempt, earlier_attempts=record.earlier,
                              all_attempts=round(sum(record.earlier) + this_attempt, 1))
    if trainer.is_global_zero:
        write_report(summary, out_dir)
    return summary


def fit_and_evaluate(trainer: L.Trainer, module: MLLMModule, dm, ckpt_path: str | None) -> tuple[str | None, dict]:
    """Fit (resuming from `ckpt_path`), then make sure the reported metrics are the best checkpoint's.
    Returns the best checkpoint and the metrics at the end of fit (train/loss, ...), which an evaluation
    run afterwards clears from the trainer."""
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    fit_metrics = logged_metrics(trainer)
    best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    if not evaluated_at_end(trainer, module, best):
        if best and is_zero3(trainer.strategy):
            load_zero3_weights(module.model, best)
            best = None
        trainer.validate(module, datamodule=dm, ckpt_path=best, verbose=False, weights_only=True)
    return best, fit_metrics


def benchmark_scores(job: RunConfig, module: MLLMModule, trainer: L.Trainer) -> dict[str, float]:
    """`eval.lmms_tasks` on the evaluated model (its plan), through lmms-eval, as `bench/<task>/<metric>`;
    prompts and preprocessing are the checkpoint's own (train/lmms/processor.py), else the training run's."""
    from .lmms.processor import EvalProcessor
    from .lmms.run import run_lmms_tasks

    e, model = job.evaluation, module.model
    if job.model.pretrained and trainer.global_step == 0:
        processor = EvalProcessor.from_pretrained(job.model.pretrained, model.config)
    else:
        processor = EvalProcessor.for_training(module.tokenizer, model.config, job.model.chat_template, job.model.system_prompt)
    scores = run_lmms_tasks(model, processor, e.lmms_tasks, e.lmms_include_path, e.lmms_batch_size, e.lmms_limit)
    for logger in trainer.loggers:
        logger.log_metrics(scores, step=trainer.global_step)
    return scores


def check_evaluable(model: ModelSource, plan: Plan) -> None:
    """Evaluation without training needs trained weights for everything the plan runs."""
    if not model.pretrained:
        raise ConfigError(
            "trainer.max_steps=0 (python -m train evaluate) evaluates a trained model: set model.pretrained=<export "
            "or llava-hf directory>, e.g. outputs/<run>/export"
        )
    names = read_shapes(model.pretrained) or {}
    missing = [i for i in plan.xattn_layers if not any(k.startswith(f"xattn.{i}.") for k in names)]
    routers = sorted({r for r in plan.routers.values() if f"routers.{r}.weight" not in names}, key=lambda r: (len(r), r))
    for what, absent in (("gated cross-attention blocks before layers", missing), ("routers", routers)):
        if absent:
            raise ConfigError(
                f"plan {plan.name!r} adds {what} {absent} that {model.pretrained} does not have (new parameters): it "
                f"needs training, e.g. python -m train stage=finetune model.pretrained={model.pretrained} arch=... "
                "trainer.max_steps=<steps>"
            )


def evaluated_at_end(trainer: L.Trainer, module: MLLMModule, best: str | None) -> bool:
    """True when fit's last evaluation ran at the final step and produced the best checkpoint: its
    metrics are the best model's, so evaluating again would only repeat the work."""
    return bool(best) and module.best_step == module.last_val_step == trainer.global_step
