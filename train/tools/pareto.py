"""`python -m train pareto <sweep_dir> [<sweep_dir> ...] [--out DIR] [--wandb]`

Efficiency versus accuracy over the runs of a sweep (e.g. `python -m train -m experiment=pareto`).
Every run directory below the sweep directories (one with `metrics.json` or `.hydra/`) becomes a
row: method = the plan's name (`arch` in metrics.json), knobs = `arch.methods` of the run's resolved
config.yaml, accuracy (overall, per skill), eff/* (FLOPs ratio, the LLM's prefill TFLOPs and the tower's
and projector's, measured latencies, KV cache), steps and seconds. Writes to --out (default: the first sweep directory; the repository's curve of the
default task is kept in docs/results/, so `--out docs/results` refreshes it in place):
  pareto.csv, pareto.md       one row per finished run, cheapest first, FLOPs convention stated
  pareto_flops.png            accuracy vs prefill FLOPs relative to dense
  pareto_latency.png          accuracy vs measured prefill latency
one marker per method, dense as the reference, the Pareto frontier (highest accuracy at no more
cost) as a step line, and a second panel for the fine-detail skill when the runs have it.
Runs without results (failed, killed, still running, or empty directories) are listed with the
reason found (the exception in the run's error.txt or in its submitit .err log, the tail of that log
or of its Hydra log) on stderr and in pareto.md; the rest are still tabulated and drawn. A JSON
summary goes to stdout. Only text, JSON and YAML are read: never submitit's result pickles (loading a
pickle runs code, and the sweep directory may be someone else's).
With --wandb, or when the runs logged to W&B, a summary run holds the table, scatter charts and
the PNGs (offline unless WANDB_MODE or the runs' logger say otherwise; `wandb sync` uploads it).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

COST_AXES = {  # x axis of each figure: (metric, file stem, axis label)
    "flops": ("eff/flops_ratio", "pareto_flops", "prefill FLOPs relative to dense"),
    "latency": ("eff/prefill_ms", "pareto_latency", "prefill latency, ms per sample (measured, batched)"),
}
TABLE_METRICS = [
    "val/acc", "val/acc_noimage", "val/acc_majority", "val/loss", "val/acc_shuffled", "val/acc_single",
    "eff/flops_ratio", "eff/prefill_tflops", "eff/visual_tflops",
    "eff/tower_tflops", "eff/projector_tflops", "eff/deepstack_tflops",  # the images before the LLM (Family.vision_flops)
    "eff/prefill_ms", "eff/decode_ms_per_token",
    "eff/kv_cache_mb", "eff/peak_mem_mb", "perf/tokens_per_s",
]
SKIP_DIRS = {".hydra", ".submitit", "checkpoints", "export", "csv", "wandb"}
MARKERS = ["o", "s", "^", "v", "D", "P", "X", "<", ">", "h", "p", "8"]
REFERENCE = "dense"
FINE = "fine"  # the fine-detail skill of the default task (one visual token carries the answer)


@dataclass
class Run:
    dir: Path
    label: str
    method: str
    model: str
    knobs: dict[str, Any]
    steps: int | None
    seconds: float | None
    metrics: dict[str, float]
    flops: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Failure:
    dir: Path
    label: str
    reason: str
    details: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- finding runs

def find_run_dirs(sweep_dir: Path, top: bool = True) -> list[Path]:
    """Directories holding one run (with metrics.json or .hydra/), searched below the sweep
    directory, plus its other direct subdirectories (e.g. an empty one left by a lost job)."""
    if _is_run(sweep_dir):
        return [sweep_dir] if top else []
    found = []
    for child in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        if child.name in SKIP_DIRS or child.name.startswith(".") or (child / "pareto.csv").exists():
            continue  # run internals, hidden (.submitit) and earlier `python -m train pareto --out` directories
        if _is_run(child):
            found.append(child)
        else:
            inner = find_run_dirs(child, top=False)  # a sweep of sweeps: look deeper
            found += inner if inner or not top else [child]
    return sorted(found, key=_job_order)


def _is_run(d: Path) -> bool:
    return (d / "metrics.json").is_file() or (d / ".hydra").is_dir()


def _job_order(d: Path):
    head = d.name.split("_", 1)[0]
    return (str(d.parent), int(head) if head.isdigit() else math.inf, d.name)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, yaml.YAMLError):
        return {}


def _hydra(d: Path) -> dict:
    """The `hydra` node Hydra saved for a job (job id, choices, overrides), or {}."""
    return _read_yaml(d / ".hydra" / "hydra.yaml").get("hydra") or {}


def _label(d: Path, config: dict, hydra_cfg: dict) -> str:
    choice = ((hydra_cfg.get("runtime") or {}).get("choices") or {}).get("pareto")
    name = config.get("run_name")
    return str(choice or (name if name and "${" not in str(name) else None) or d.name)


def read_run(d: Path, sweep_dir: Path) -> Run | Failure:
    config = _read_yaml(d / "config.yaml") or _read_yaml(d / ".hydra" / "config.yaml")
    hydra_cfg = _hydra(d)
    label = _label(d, config, hydra_cfg)
    path = d / "metrics.json"
    if not path.is_file():
        if not any(d.iterdir()):
            return Failure(d, label, "empty directory: the job never started (or its files were removed)")
        if not _is_run(d):
            return Failure(d, label, "no metrics.json or .hydra/ inside: not a run directory, or its job never started")
        reason, details = failure_reason(d, sweep_dir, hydra_cfg)
        return Failure(d, label, reason, details)
    try:
        summary = json.loads(path.read_text())
        metrics = {k: float(v) for k, v in summary["metrics"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return Failure(d, label, f"unreadable metrics.json ({type(e).__name__}: {e})")
    if not math.isfinite(metrics.get("val/acc", math.nan)):
        return Failure(d, label, "metrics.json has no val/acc (the evaluation did not finish)")
    seconds = summary.get("seconds")
    return Run(
        dir=d,
        label=label,
        method=str(summary.get("arch") or REFERENCE),
        model=str(summary.get("model", "")),
        knobs=arch_knobs(config.get("arch") or {}),
        steps=summary.get("steps"),
        seconds=seconds.get("all_attempts", seconds.get("total")) if isinstance(seconds, dict) else seconds,
        metrics=metrics,
        flops=summary.get("flops"),
        config=config,
    )


def arch_knobs(arch: dict) -> dict[str, Any]:
    """`{method: {knob: value}}` of a resolved `arch` config (reading a plan file it points to)."""
    if arch.get("path") and Path(arch["path"]).is_file():
        arch = _read_yaml(Path(arch["path"]))
    knobs = {name: dict(v or {}) if isinstance(v, dict) else v for name, v in (arch.get("methods") or {}).items()}
    for key in ("pre_llm", "layers"):
        if arch.get(key):
            knobs[key] = arch[key]
    return knobs


def failure_reason(d: Path, sweep_dir: Path, hydra_cfg: dict) -> tuple[str, list[str]]:
    """Why a run has no metrics.json: the exception in its error.txt (train/__main__.py writes it) or in
    its submitit .err log, else whether submitit saw the job end, with the tail of the first log found."""
    reason = "no metrics.json: the job failed, was killed, or is still running"
    job_id = str((hydra_cfg.get("job") or {}).get("id") or "")
    files = submitit_files(sweep_dir, job_id) if job_id else {}
    logs = [p for p in [d / "error.txt", files.get("err"), files.get("out"), *sorted(d.glob("*.log"))] if p and p.is_file()]
    error = next(filter(None, (raised(read_text(p)) for p in logs)), None)
    if error:
        reason = f"no metrics.json: the job raised {error}"
    elif "result" in files:  # only its existence: submitit writes it when the job function returns or raises
        reason = "no metrics.json: the job ended without results (see its log)"
    elif files:
        reason = "no metrics.json and no submitit result: the job was killed (time limit, memory, preemption) or is still running"
    for path in logs:
        tail = log_tail(path)
        if tail:
            return reason, [f"{path}:"] + tail
    return reason, []


def submitit_files(sweep_dir: Path, job_id: str) -> dict[str, Path]:
    """The submitit files of one job (`.submitit/<job id>/<job id>_<task>_{log.err,log.out,result.pkl}`);
    the result pickle is only ever tested for existence."""
    out: dict[str, Path] = {}
    for folder in sweep_dir.glob("**/.submitit"):
        for p in sorted(folder.glob(f"*/{job_id}_*")):
            for key, suffix in (("err", "_log.err"), ("out", "_log.out"), ("result", "_result.pkl")):
                if p.name.endswith(suffix) and p.name[: -len(suffix)].rsplit("_", 1)[0] == job_id:
                    out.setdefault(key, p)
    return out


def read_text(path: Path) -> str:
    """A log's text with progress-bar redraws collapsed to their last state ('' if unreadable)."""
    try:
        text = path.read_bytes().decode(errors="replace")  # keeps the \r of progress bars (read_text would not)
    except OSError:
        return ""
    return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1].rstrip() for line in text.split("\n"))


def raised(text: str) -> str | None:
    """The exception line (`ValueError: ...`) that ends the last Python traceback in a log, if any."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
    if not starts:
        return None
    return next((line.strip() for line in lines[starts[-1] + 1:] if line.strip() and not line[0].isspace()), None)


def log_tail(path: Path, n: int = 12) -> list[str]:
    """The last n non-empty lines of a log (progress-bar redraws collapsed to their last state)."""
    return ["  | " + line for line in read_text(path).split("\n") if line.strip()][-n:]


def collect(sweep_dirs: Sequence[Path]) -> tuple[list[Run], list[Failure]]:
    runs: list[Run] = []
    failures: list[Failure] = []
    for sweep in sweep_dirs:
        dirs = find_run_dirs(sweep)
        seen_ids = set()
        for d in dirs:
            item = read_run(d, sweep)
            (runs if isinstance(item, Run) else failures).append(item)
            seen_ids.add(str((_hydra(d).get("job") or {}).get("id")))
        failures += lost_jobs(sweep, seen_ids)
    return runs, failures


def lost_jobs(sweep_dir: Path, seen_ids: set[str]) -> list[Failure]:
    """Submitit jobs that never made a run directory (e.g. a crash before Hydra set the job up)."""
    lost = []
    for folder in sorted(sweep_dir.glob("**/.submitit/*")):
        if not folder.is_dir() or folder.name in seen_ids or not list(folder.glob("*_submitted.pkl")):
            continue
        files = submitit_files(sweep_dir, folder.name)
        if not ({"err", "out", "result"} & set(files)):
            continue  # queued or never ran: nothing to report yet
        error = next(filter(None, (raised(read_text(files[k])) for k in ("err", "out") if k in files)), None)
        reason = f"submitit job {folder.name} made no run directory" + (f": {error}" if error else "")
        details = ([f"{files['err']}:"] + log_tail(files["err"])) if "err" in files else []
        lost.append(Failure(folder, f"job {folder.name}", reason, details))
    return lost


# ---------------------------------------------------------------- table and frontier

def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points that no other point dominates (no more cost and at least the accuracy,
    one of them strictly), ordered by cost. Points with a non-finite coordinate are ignored; of exact
    duplicates the first is kept."""
    finite = [i for i, (c, a) in enumerate(points) if math.isfinite(c) and math.isfinite(a)]
    order = sorted(finite, key=lambda i: (points[i][0], -points[i][1], i))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def skills(runs: Sequence[Run]) -> list[str]:
    return sorted({k.split("/", 2)[2] for r in runs for k in r.metrics if k.startswith("val/acc/")})


def varying_knobs(runs: Sequence[Run]) -> dict[str, set[str]]:
    """Per method, the knobs whose values differ between its runs (what labels its points)."""
    out: dict[str, set[str]] = {}
    for method in {r.method for r in runs}:
        flat = [flatten_knobs(r.knobs) for r in runs if r.method == method]
        keys = set().union(*flat)
        out[method] = {k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1}
    return out


def flatten_knobs(knobs: dict[str, Any]) -> dict[str, Any]:
    single = len(knobs) == 1
    out = {}
    for name, v in knobs.items():
        if isinstance(v, dict):
            out.update({(k if single else f"{name}.{k}"): x for k, x in v.items()})
        else:
            out[name] = v
    return out


def knob_text(knobs: dict[str, Any], only: set[str] | None = None) -> str:
    flat = flatten_knobs(knobs)
    return " ".join(f"{k}={_fmt(v)}" for k, v in flat.items() if only is None or k in only)


def _fmt(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    return json.dumps(v) if isinstance(v, dict) else str(v)


def protocol(r: Run) -> str:
    """How the point's model was obtained: the base evaluated as is, fine-tuned from it, or from scratch."""
    if not r.steps:
        return "training-free"
    return f"fine-tuned {r.steps} steps" if (r.config.get("model") or {}).get("pretrained") else f"from scratch {r.steps} steps"


def build_rows(runs: Sequence[Run], accuracy: str = "val/acc") -> list[dict[str, Any]]:
    """One row per run, cheapest (FLOPs) first, with the frontier membership (on `accuracy`) for each
    cost axis."""
    names = skills(runs)
    varying = varying_knobs(runs)
    rows = []
    for r in runs:
        row = {"point": r.label, "method": r.method, "protocol": protocol(r), "model": r.model, "knobs": knob_text(r.knobs),
               "varied": knob_text(r.knobs, varying.get(r.method)), "steps": r.steps, "seconds": r.seconds}
        for k in TABLE_METRICS[:6] + [f"val/acc/{s}" for s in names] + TABLE_METRICS[6:]:
            row[k] = r.metrics.get(k, math.nan)
        coarse = [r.metrics[f"val/acc/{s}"] for s in names if s != FINE and f"val/acc/{s}" in r.metrics]
        row["val/acc_coarse"] = sum(coarse) / len(coarse) if coarse and FINE in names else math.nan
        if accuracy not in row:
            row[accuracy] = r.metrics.get(accuracy, math.nan)
        row["run_dir"] = str(r.dir)
        rows.append(row)
    for axis, (metric, _, _) in COST_AXES.items():
        front = set(pareto_front([(row[metric], row[accuracy]) for row in rows]))
        for i, row in enumerate(rows):
            row[f"frontier_{axis}"] = i in front
    rows.sort(key=lambda row: (_nan_last(row["eff/flops_ratio"]), -_nan_zero(row[accuracy]), row["point"]))
    return rows


def _nan_zero(x: float) -> float:
    return 0.0 if x is None or not math.isfinite(x) else x


def _nan_last(x: float) -> float:
    return math.inf if x is None or not math.isfinite(x) else x


def convention_text(runs: Sequence[Run]) -> str:
    conventions = {json.dumps(r.flops, sort_keys=True) for r in runs}
    if len(conventions) > 1:
        return "MIXED FLOPs conventions across runs (ratios are not comparable): " + "; ".join(sorted(conventions))
    flops = runs[0].flops if runs else None
    if not flops:
        return "FLOPs convention not recorded (no efficiency callback)"
    mac = "2 x multiply-accumulates" if flops.get("convention") == "2mac" else flops.get("convention")
    return (f"FLOPs = {mac}, prefill, per sample, decoder layers, scope={flops.get('scope')}; "
            "ratio against the dense plan of the same model")


def write_csv(rows: Sequence[dict], path: Path) -> None:
    keys = list(rows[0]) if rows else ["point"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})


def _cell(v: Any, digits: int = 3) -> str:
    if isinstance(v, bool):
        return "✓" if v else ""
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.{digits}f}"
    return "–" if v is None else str(v).replace("|", "\\|")


def write_markdown(rows: Sequence[dict], runs: Sequence[Run], failures: Sequence[Failure], sweep_dirs, path: Path,
                   accuracy: str = "val/acc") -> None:
    names = skills(runs)
    detail = [f"val/acc/{s}" for s in names if s == "fine"]
    cols = [("point", "point", None), ("method", "method", None), ("protocol", "protocol", None), ("knobs", "knobs", None),
            (accuracy, accuracy.removeprefix("val/"), 3)]
    if detail:
        cols += [("val/acc_coarse", "coarse", 3)]
    cols += [(k, k.split("/")[-1], 3) for k in detail]
    if any("val/acc_shuffled" in r.metrics for r in runs):  # video: every skill beside the frame-order controls
        cols += [(f"val/acc/{s}", s, 3) for s in names] + [("val/acc_shuffled", "frames shuffled", 3), ("val/acc_single", "one frame", 3)]
    cols += [("val/acc_noimage", "acc no image", 3), ("eff/flops_ratio", "FLOPs ratio", 3),
             ("eff/prefill_ms", "prefill ms", 2), ("eff/decode_ms_per_token", "decode ms/token", 2),
             ("eff/kv_cache_mb", "KV MB", 3), ("steps", "steps", None), ("seconds", "seconds", 1),
             ("frontier_flops", "front (FLOPs)", None), ("frontier_latency", "front (latency)", None)]
    lines = [
        f"# Efficiency vs accuracy: {', '.join(str(s) for s in sweep_dirs)}",
        "",
        f"- {len(runs)} finished runs, {len(failures)} without results; model(s): {', '.join(sorted({r.model for r in runs}))}",
        f"- {convention_text(runs)}",
        "- prefill ms: measured at evaluation on the training device, batched prefill divided by the batch; "
        "decode ms/token: one greedy step for the whole batch; KV MB: per sample",
        f"- {accuracy}: on the validation set, answers read harness-style (train/evaluation.py); coarse: mean of "
        "the skills other than fine detail (per-skill accuracies in pareto.csv); protocol: the base evaluated "
        "as is (training-free), fine-tuned from it, or trained from scratch; front: on the Pareto frontier "
        "(no other run is as accurate at no more cost)",
        "",
        "| " + " | ".join(c[1] for c in cols) + " |",
        "|" + "|".join("---" if c[2] is None else "---:" for c in cols) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k), d or 3) for k, _, d in cols) + " |")
    if failures:
        lines += ["", "## Runs without results", ""]
        for f in failures:
            lines.append(f"- `{f.dir}` ({f.label}): {f.reason}")
            if f.details:
                lines += ["", "  ```"] + ["  " + x for x in f.details] + ["  ```"]
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- plots

def method_styles(methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    import matplotlib

    colors = matplotlib.colormaps["tab10"].colors
    styles, k = {}, 0
    for m in sorted(set(methods), key=lambda m: (m != REFERENCE, m)):
        if m == REFERENCE:
            styles[m] = {"marker": "*", "color": "black", "s": 220, "zorder": 5}
        else:
            styles[m] = {"marker": MARKERS[k % len(MARKERS)], "color": colors[k % len(colors)], "s": 60, "zorder": 4}
            k += 1
    return styles


def plot(rows: Sequence[dict], axis: str, path: Path, title: str, convention: str, n_failed: int,
         accuracy: str = "val/acc") -> Path:
    """One panel per accuracy (overall; with a fine-detail skill also the coarse skills and the fine one)
    against the cost axis: one marker and colour per method, hollow when training-free, a line through
    each method's points of one protocol, dense as the reference line, the Pareto frontier in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    metric, _, xlabel = COST_AXES[axis]
    panels = [(accuracy, f"{accuracy} (all questions)")]
    if any(math.isfinite(row.get(f"val/acc/{FINE}", math.nan)) for row in rows) and accuracy == "val/acc":
        panels += [("val/acc_coarse", "coarse skills (mean of the skills but fine detail)"),
                   (f"val/acc/{FINE}", "fine detail (one visual token carries the answer)")]
    styles = method_styles([row["method"] for row in rows])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 5.2), squeeze=False)
    for ax, (ykey, ylabel) in zip(axes[0], panels):
        pts = [(row[metric], row.get(ykey, math.nan)) for row in rows]
        ok = [i for i, (x, y) in enumerate(pts) if math.isfinite(x) and math.isfinite(y)]
        for method, st in styles.items():
            for proto in sorted({rows[i]["protocol"] for i in ok if rows[i]["method"] == method}):
                idx = sorted((i for i in ok if rows[i]["method"] == method and rows[i]["protocol"] == proto), key=lambda i: pts[i][0])
                xs, ys = [pts[i][0] for i in idx], [pts[i][1] for i in idx]
                free = proto == "training-free" and method != REFERENCE
                ax.scatter(xs, ys, marker=st["marker"], s=st["s"], zorder=st["zorder"], linewidths=1.2,
                           facecolors="white" if free else st["color"], edgecolors=st["color"])
                if len(idx) > 1:
                    ax.plot(xs, ys, color=st["color"], alpha=0.35, lw=1, ls=":" if free else "-", zorder=2)
                for i in idx:
                    if rows[i]["varied"]:
                        ax.annotate(rows[i]["varied"], pts[i], textcoords="offset points", xytext=(5, 4), fontsize=7,
                                    color=st["color"])
        for i in ok:
            if rows[i]["method"] == REFERENCE and rows[i]["protocol"] == "training-free":
                ax.axhline(pts[i][1], color="black", ls=":", lw=1, zorder=1)
        majority = [row.get("val/acc_majority", math.nan) for row in rows]
        majority = [m for m in majority if math.isfinite(m)]
        if ykey == "val/acc" and majority:
            ax.axhline(sum(majority) / len(majority), color="#999999", ls="--", lw=1, zorder=1)
        front = pareto_front([pts[i] for i in ok])
        if front:
            fx = [pts[ok[j]][0] for j in front]
            fy = [pts[ok[j]][1] for j in front]
            right = max(pts[i][0] for i in ok)
            ax.step(fx + [right], fy + [fy[-1]], where="post", color="#d62728", lw=1.5, alpha=0.8, zorder=3)
            ax.scatter(fx, fy, s=160, facecolors="none", edgecolors="#d62728", lw=1.2, zorder=6)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xlim(left=0)
        _accuracy_limits(ax, [pts[i][1] for i in ok] + (majority if ykey == "val/acc" else []))
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], marker=st["marker"], color=st["color"], ls="", markersize=8,
                      label=f"{m} (reference)" if m == REFERENCE else m) for m, st in styles.items()]
    handles += [Line2D([], [], marker="o", color="gray", markerfacecolor="white", ls="", label="hollow: training-free"),
                Line2D([], [], marker="o", color="gray", ls="", label="filled: trained (fine-tuned / scratch)"),
                Line2D([], [], color="#d62728", lw=1.5, label="Pareto frontier"),
                Line2D([], [], color="black", ls=":", lw=1, label="dense base"),
                Line2D([], [], color="#999999", ls="--", lw=1, label="majority-answer baseline")]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9, frameon=False)
    note = f"; {n_failed} run(s) without results not shown" if n_failed else ""
    foot = convention if axis == "flops" else "latency measured at evaluation on the training device: batched prefill / batch"
    fig.text(0.5, -0.01, foot, ha="center", va="top", fontsize=8, color="#555555")
    fig.suptitle(f"{title}: accuracy vs {'FLOPs' if axis == 'flops' else 'measured prefill latency'} "
                 f"({len(rows)} runs{note})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def _accuracy_limits(ax, values: Sequence[float]) -> None:
    """A y range inside [0, 1] around the values, at least 0.1 tall (flat results stay readable)."""
    if not values:
        return
    lo, hi = min(values), max(values)
    pad = max(0.02, 0.08 * (hi - lo), (0.1 - (hi - lo)) / 2)
    lo, hi = lo - pad, hi + pad
    if lo < 0:
        lo, hi = 0.0, min(1.0, hi - lo)
    if hi > 1:
        lo, hi = max(0.0, lo - (hi - 1)), 1.0
    ax.set_ylim(lo - 0.01, hi + 0.01)


# ---------------------------------------------------------------- W&B

def wandb_settings(runs: Sequence[Run], forced: bool) -> dict[str, Any] | None:
    """Project and mode for the summary run: from the runs' W&B logger, or defaults with --wandb."""
    logger = next(((r.config.get("logger") or {}).get("wandb") for r in runs
                   if isinstance((r.config.get("logger") or {}).get("wandb"), dict)), None)
    if logger is None and not forced:
        return None
    logger = logger or {}
    mode = os.environ.get("WANDB_MODE") or ("offline" if logger.get("offline", True) else "online")
    return {"project": logger.get("project") or "efficient-mllm", "group": logger.get("group"), "mode": mode}


def log_wandb(rows: Sequence[dict], plots: dict[str, Path], summary: dict, settings: dict, out: Path, name: str) -> str:
    import wandb

    columns = list(rows[0])
    table = wandb.Table(columns=columns, data=[[_wandb_value(row[c]) for c in columns] for row in rows])
    run = wandb.init(project=settings["project"], group=settings["group"], name=f"pareto-{name}", job_type="pareto",
                     dir=str(out), mode=settings["mode"], config={"sweep_dirs": summary["sweep_dirs"]})
    try:
        log = {"pareto/table": table}
        for axis, (metric, _, xlabel) in COST_AXES.items():
            accuracy = summary["accuracy"]
            log[f"pareto/acc_vs_{axis}"] = wandb.plot.scatter(table, metric, accuracy, title=f"{accuracy} vs {xlabel}")
            log[f"pareto/plot_{axis}"] = wandb.Image(str(plots[axis]))
        run.log(log)
        run.summary.update({"n_runs": summary["n_runs"], "n_failed": summary["n_failed"],
                            "frontier_flops": summary["frontier"]["flops"],
                            "frontier_latency": summary["frontier"]["latency"]})
        where = run.dir
    finally:
        run.finish()
    return str(Path(where).parent)


def _wandb_value(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


# ---------------------------------------------------------------- CLI

def report_failures(failures: Sequence[Failure], stream=None) -> None:
    stream = stream or sys.stderr
    if not failures:
        return
    print(f"pareto: {len(failures)} run(s) without results (left out of the table and plots):", file=stream)
    for f in failures:
        print(f"- {f.dir} [{f.label}]: {f.reason}", file=stream)
        for line in f.details:
            print(f"    {line}", file=stream)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train pareto", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dirs", nargs="+", type=Path, help="multirun directories (or single run directories)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: the first sweep directory)")
    p.add_argument("--wandb", action="store_true", help="log a W&B summary run (offline unless WANDB_MODE=online)")
    p.add_argument("--metric", default="val/acc", help="the accuracy axis: a metric in the runs' metrics.json, e.g. "
                   "bench/pope/accuracy from python -m train evaluate eval.lmms_tasks=[...] (default: val/acc)")
    args = p.parse_args(argv)

    missing = [str(d) for d in args.sweep_dirs if not d.is_dir()]
    if missing:
        print(f"pareto: no such directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    runs, failures = collect(args.sweep_dirs)
    report_failures(failures)
    if not runs:
        print(f"pareto: no finished runs (metrics.json) under {', '.join(map(str, args.sweep_dirs))}", file=sys.stderr)
        print(json.dumps({"n_runs": 0, "n_failed": len(failures), "failed": [_failure_json(f) for f in failures]}))
        return 1
    out = args.out or args.sweep_dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    rows = build_rows(runs, args.metric)
    if not any(math.isfinite(row[args.metric]) for row in rows):
        print(f"pareto: no run has {args.metric} in its metrics.json", file=sys.stderr)
        return 2
    convention = convention_text(runs)
    name = args.sweep_dirs[0].resolve().name
    title = "/".join(args.sweep_dirs[0].resolve().parts[-2:])
    if len(args.sweep_dirs) > 1:
        title += f" + {len(args.sweep_dirs) - 1} more sweep dir(s)"
    write_csv(rows, out / "pareto.csv")
    write_markdown(rows, runs, failures, args.sweep_dirs, out / "pareto.md", args.metric)
    plots = {axis: plot(rows, axis, out / f"{stem}.png", title, convention, len(failures), args.metric)
             for axis, (_, stem, _) in COST_AXES.items()}
    summary = {
        "sweep_dirs": [str(d) for d in args.sweep_dirs],
        "csv": str(out / "pareto.csv"),
        "markdown": str(out / "pareto.md"),
        "plots": {axis: str(path) for axis, path in plots.items()},
        "n_runs": len(runs),
        "n_failed": len(failures),
        "failed": [_failure_json(f) for f in failures],
        "accuracy": args.metric,
        "frontier": {axis: [_frontier_json(row, metric, args.metric) for row in sorted(rows, key=lambda r: r[metric])
                            if row[f"frontier_{axis}"]] for axis, (metric, _, _) in COST_AXES.items()},
        "flops_convention": convention,
        "wandb": None,
    }
    settings = wandb_settings(runs, args.wandb)
    if settings:
        summary["wandb"] = log_wandb(rows, plots, summary, settings, out, name)
    print(json.dumps(summary, indent=2))
    return 0


def _failure_json(f: Failure) -> dict:
    return {"run_dir": str(f.dir), "point": f.label, "reason": f.reason}


def _frontier_json(row: dict, metric: str, accuracy: str) -> dict:
    return {"point": row["point"], "method": row["method"], accuracy: row[accuracy], metric: row[metric]}


if __name__ == "__main__":
    sys.exit(main())
