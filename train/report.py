"""What a run reports: `metrics.json` (the final metrics beside what produced them) and the summary
printed at the end. Training runs and evaluation-only runs write the same file."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from .callbacks import EfficiencyMetrics

REPORTED = ("val", "eff", "perf", "train", "data", "bench", "route")  # metric namespaces kept in metrics.json


def logged_metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.split("/")[0] in REPORTED}


def flops_counting(trainer: L.Trainer) -> dict | None:
    """How eff/*flops* were counted, from the callback that counted them."""
    return next((cb.counting() for cb in trainer.callbacks if isinstance(cb, EfficiencyMetrics)), None)


def write_report(summary: dict, out_dir: str | Path) -> None:
    (Path(out_dir) / "metrics.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)


def print_finished(summary: dict) -> None:
    """A run directory whose run already finished: say so, and where its results are."""
    print(f"this run already finished ({summary['steps']} steps); its results are left as they are in "
          f"{summary['run_dir']}/metrics.json. To train it further: resume.extend_to=<steps>; for a new run: "
          "another hydra.run.dir", flush=True)
    print_summary(summary)


def wall_time(seconds: dict) -> str:
    """Every attempt's seconds (a resumed run's earlier attempts included)."""
    earlier = seconds.get("earlier_attempts") or []
    total = seconds.get("all_attempts", seconds["total"])
    return f"{total} s" + (f" ({len(earlier) + 1} attempts)" if earlier else "")


def print_summary(summary: dict) -> None:
    m = summary["metrics"]
    what = f"{summary['steps']} steps" if summary["steps"] else f"evaluated {summary.get('checkpoint', '')}"
    skills = "  ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in sorted(m.items()) if k.startswith("val/acc/"))
    lines = [
        "",
        f"== {summary['model']} / {summary['arch']}: {what} in {wall_time(summary['seconds'])} ==",
        f"val/acc {m.get('val/acc', float('nan')):.3f}   acc_noimage {m.get('val/acc_noimage', float('nan')):.3f}   "
        f"acc_majority {m.get('val/acc_majority', float('nan')):.3f}   val/loss {m.get('val/loss', float('nan')):.4f}",
        *([f"per skill: {skills}"] if skills else []),
        *([f"skipped:  {skipped}"] if (skipped := skipped_line(m)) else []),
        f"metrics:  {summary['run_dir']}/metrics.json",
        f"config:   {summary['run_dir']}/config.yaml",
    ]
    if "export" in summary:
        loader = summary.get("export_class", "LlavaForConditionalGeneration")
        if summary.get("export_layout") == "original":  # no transformers class: LLaVA's own files, its tower inside
            lines.append(f"model:    {summary['export']}  (the original LLaVA layout, tower in vision_tower/: "
                         f"MLLM.from_pretrained / the original code's {loader})")
        elif loader is None:  # the plan's own modules (routers, gated blocks): transformers would drop them
            lines.append(f"model:    {summary['export']}  ({summary['export_note']})")
        else:
            lines.append(f"model:    {summary['export']}  (MLLM.from_pretrained / {loader}.from_pretrained)")
    print("\n".join(lines), flush=True)


def skipped_line(metrics: dict[str, float]) -> str:
    """`3 sample(s): no_conversations 2, corrupt_image 1` from the data/skipped_samples* metrics ('' for none).
    Counts are occurrences: a bad sample is met again in every training epoch and every evaluation."""
    total = int(metrics.get("data/skipped_samples", 0))
    if not total:
        return ""
    prefix = "data/skipped_samples/"
    reasons = sorted(((k[len(prefix):], int(v)) for k, v in metrics.items() if k.startswith(prefix)), key=lambda kv: -kv[1])
    return f"{total} sample(s)" + (": " + ", ".join(f"{r} {n}" for r, n in reasons) if reasons else "") + \
        " (data/skipped_samples/<reason> in metrics.json; docs/data-conversion.md)"
