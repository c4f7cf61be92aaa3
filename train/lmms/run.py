"""Evaluate an in-memory model on lmms-eval tasks and return flat `bench/<task>/<metric>` scores."""

from __future__ import annotations

from pathlib import Path

from models import MLLM

from .model import EfficientMLLM
from .processor import EvalProcessor


def run_lmms_tasks(
    model: MLLM,
    processor: EvalProcessor,
    tasks: list[str],
    include_path: str | Path | list | None = None,
    batch_size: int = 1,
    limit: int | float | None = None,
) -> dict[str, float]:
    """Scores of `model` (with its current plan) on lmms-eval `tasks`, e.g. `bench/pope/pope_accuracy`.

    `include_path`: extra task directories (local YAMLs); `limit`: documents per task (a fraction
    if < 1). Standard errors are not computed (bootstrap_iters=0)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    paths = [str(p) for p in (include_path if isinstance(include_path, list) else [include_path])] if include_path else None
    manager = TaskManager(include_path=paths, model_name="efficient_mllm")
    lm = EfficientMLLM.from_model(model, processor, batch_size)
    out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False, bootstrap_iters=0)
    return {} if out is None else flatten_results(out["results"])  # lmms-eval returns scores on rank 0 only


def flatten_results(results: dict) -> dict[str, float]:
    """lmms-eval's `{task: {"metric,filter": value, ...}}` -> `{"bench/task/metric": value}`
    (`metric/filter` for filters other than `none`; standard errors and aliases left out)."""
    flat = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, flt = key.partition(",")
            if key == "alias" or "_stderr" in metric or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            flat[f"bench/{task}/{metric if flt in ('', 'none') else f'{metric}/{flt}'}"] = float(value)
    return flat
