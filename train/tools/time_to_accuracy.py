"""`python -m train time_to_accuracy <run_dir> [<run_dir> ...] [--target ACC] [--out DIR]`

Accuracy against training wall-clock for runs that evaluated along the way (`trainer.val_check_interval`
below `trainer.max_steps`, e.g. `python -m train experiment=base` and `experiment=scratch arch=vica`): at
every evaluation each run logged `val/acc` and `perf/train_seconds` (wall-clock spent training so far,
data loading included, evaluations excluded) to its `csv/metrics.csv`. Writes to --out (default: the
first run directory's parent; the repository's curves are kept in docs/results/, so `--out docs/results`
refreshes them in place):
  time_to_accuracy.csv / .md   one row per evaluation of every run
  time_to_accuracy.png         val/acc against training minutes, one line per run
and prints a JSON summary: per run its best accuracy and the training time at which it first reached
`--target` (default: the first run's final accuracy), so "how much sooner" is one division, and with
`--budget SECONDS` its best accuracy within that much training (the equal-budget comparison).
Only CSV, YAML and JSON files that runs write are read.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import yaml


def evaluations(run_dir: Path) -> list[dict]:
    """(step, train seconds, val metrics) of every evaluation during fit, earlier attempts included."""
    files = sorted((run_dir / "csv").glob("metrics.*.csv")) + [run_dir / "csv" / "metrics.csv"]
    rows: dict[int, dict] = {}
    for f in files:
        if not f.is_file():
            continue
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("val/acc") and row.get("perf/train_seconds"):
                    step = int(float(row["step"]))
                    rows[step] = {"step": step, "train_seconds": float(row["perf/train_seconds"]),
                                  **{k: float(v) for k, v in row.items() if k.startswith("val/") and v}}
    return [rows[s] for s in sorted(rows)]


def run_name(run_dir: Path) -> str:
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    return str((config or {}).get("run_name") or run_dir.name)


def run_label(run_dir: Path, taken: dict) -> str:
    """The run's name, or its directory's path where another run already has that name (two runs of one
    model and plan, e.g. two families, must not overwrite each other's rows)."""
    name = run_name(run_dir)
    return name if name not in taken else str(run_dir)


def first_reaching(evals: list[dict], target: float) -> dict | None:
    return next((e for e in evals if e["val/acc"] >= target - 1e-9), None)


def summarize(runs: dict[str, list[dict]], target: float | None, budget: float | None = None) -> dict:
    if target is None:
        first = next(iter(runs.values()))
        target = first[-1]["val/acc"] if first else math.nan
    out = {"target": target, "budget_seconds": budget, "runs": {}}
    for name, evals in runs.items():
        hit = first_reaching(evals, target)
        out["runs"][name] = {
            "evaluations": len(evals),
            "best_acc": max((e["val/acc"] for e in evals), default=math.nan),
            "final_acc": evals[-1]["val/acc"] if evals else math.nan,
            "train_seconds": evals[-1]["train_seconds"] if evals else math.nan,
            "reaches_target_at_seconds": hit["train_seconds"] if hit else None,
            "reaches_target_at_step": hit["step"] if hit else None,
        }
        if budget is not None:
            within = [e for e in evals if e["train_seconds"] <= budget]
            best = max(within, key=lambda e: e["val/acc"], default=None)
            out["runs"][name]["within_budget"] = {"best_acc": best["val/acc"], "step": best["step"],
                                                  "train_seconds": best["train_seconds"]} if best else None
    return out


def plot(runs: dict[str, list[dict]], target: float, path: Path, budget: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    for name, evals in runs.items():
        ax.plot([e["train_seconds"] / 60 for e in evals], [e["val/acc"] for e in evals], marker="o", label=name)
    if math.isfinite(target):
        ax.axhline(target, color="gray", linestyle=":", label=f"target {target:.3f}")
    if budget is not None:
        ax.axvline(budget / 60, color="gray", linestyle="--", label=f"budget {budget / 60:.1f} min")
    ax.set_xlabel("training wall-clock, minutes (evaluations excluded)")
    ax.set_ylabel("val/acc")
    ax.set_title("time to accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_tables(runs: dict[str, list[dict]], out: Path) -> None:
    skills = sorted({k for evals in runs.values() for e in evals for k in e if k.startswith("val/acc/")})
    cols = ["run", "step", "train_seconds", "val/acc", *skills]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    with open(out / "time_to_accuracy.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for name, evals in runs.items():
            for e in evals:
                values = [name, e["step"], round(e["train_seconds"], 1), *(round(e.get(k, math.nan), 4) for k in cols[3:])]
                w.writerow(values)
                lines.append("| " + " | ".join(str(v) for v in values) + " |")
    (out / "time_to_accuracy.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m train time_to_accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories (with csv/metrics.csv)")
    p.add_argument("--target", type=float, default=None, help="accuracy to reach (default: the first run's final val/acc)")
    p.add_argument("--budget", type=float, default=None, help="training seconds: each run's best accuracy within them")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    runs = {}
    for d in args.runs:
        evals = evaluations(d)
        if not evals:
            print(f"error: {d} has no evaluations with perf/train_seconds in csv/metrics.csv "
                  "(run it with trainer.val_check_interval below trainer.max_steps)", file=sys.stderr)
            raise SystemExit(2)
        runs[run_label(d, runs)] = evals
    summary = summarize(runs, args.target, args.budget)
    out = args.out or args.runs[0].parent
    out.mkdir(parents=True, exist_ok=True)
    write_tables(runs, out)
    plot(runs, summary["target"], out / "time_to_accuracy.png", args.budget)
    summary["files"] = [str(out / f) for f in ("time_to_accuracy.csv", "time_to_accuracy.md", "time_to_accuracy.png")]
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
