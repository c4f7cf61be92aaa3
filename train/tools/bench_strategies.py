"""`python -m train bench_strategies [bench_strategies.strategies=[ddp,deepspeed_zero2]] [bench_strategies.*=...]`

Runs the real multi-process training (`python -m train strategy=<s> trainer.devices=<n> ...`, a few
steps of the dense plan at `stage=finetune`, no evaluation, checkpoint or export) once per strategy,
one after another, and reports each rank's peak memory and mean step time (warm-up steps excluded),
which the runs' `RankStats` callback writes (`train/tools/rank_stats.py`). A failing strategy is reported
with its error and the next one runs. Beside the measurements: the analytic model states per rank
(`models/memory.py`, fp32 on CPU) for the same model and rank count.
Prints a JSON list of rows and writes `{out}/<time>/results.json`:
  {"strategy","ok","error","seconds","peak_memory_mb_max","mean_step_ms","estimated_states_mb","ranks":[...]}
On CPU, memory is each process's peak RSS (Python, libraries and data included, not only the model).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from models.memory import STRATEGIES, model_states

from ..builders import build, build_data
from .cli import compose_cli
from .memory import count_params, meta_model

ROOT = Path(__file__).resolve().parents[1]


def train_overrides(b, strategy: str, run_dir: Path) -> list[str]:
    data = run_dir.parent.parent / "data_cache"  # shared by this benchmark's runs only
    return [
        f"strategy={strategy}", f"model={b.model}", "arch=dense", "stage=finetune",
        f"run_name=strategy-{strategy}", f"paths.log_dir={run_dir / 'runs'}", f"paths.data_dir={data}",
        f"data.source.root={data}/synthetic", "data.source.n_train=64", "data.source.n_val=12", "data.num_workers=0",
        f"data.batch_size={b.batch_size}", f"data.max_length={b.max_length}",
        f"trainer.accelerator={b.accelerator}", f"trainer.devices={b.devices}", f"trainer.max_steps={b.steps}",
        f"trainer.val_check_interval={b.steps}", "trainer.limit_val_batches=0", "logger=none", "export=false",
        "callbacks=strategy_bench", f"callbacks.rank_stats.out_dir={run_dir / 'rank_stats'}",
        f"callbacks.rank_stats.warmup_steps={b.warmup_steps}", *b.overrides,
    ]


def run_one(b, strategy: str, run_dir: Path) -> dict:
    """One `python -m train` run in its own process group (killed whole on timeout)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(b.threads_per_rank), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "train", *train_overrides(b, strategy, run_dir)]
    start, load = time.time(), round(os.getloadavg()[0], 2)
    with open(run_dir / "stdout.log", "w") as out, open(run_dir / "stderr.log", "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            rc = proc.wait(timeout=b.timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            try:  # ranks Lightning started are in the same session: none may outlive the run
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    row = {"strategy": strategy, "ok": False, "error": None, "seconds": round(time.time() - start, 1),
           "load_average_1m_at_start": load, "command": " ".join(cmd[1:])}
    ranks = [json.loads(p.read_text()) for p in sorted((run_dir / "rank_stats").glob("rank*.json"))]
    if rc is None:
        row["error"] = f"timed out after {b.timeout_s} s"
    elif rc != 0:
        row["error"] = f"exit code {rc}: " + last_error((run_dir / "stderr.log").read_text())
    elif len(ranks) != b.devices:
        row["error"] = f"{len(ranks)} of {b.devices} ranks wrote stats"
    else:
        row["ok"] = True
    row["ranks"] = ranks
    row["peak_memory_mb_max"] = max((r["peak_memory_mb"] for r in ranks), default=None)
    steps = [r["mean_step_ms"] for r in ranks if r["mean_step_ms"] is not None]
    row["mean_step_ms"] = round(sum(steps) / len(steps), 1) if steps else None
    return row


def last_error(stderr: str) -> str:
    """The last traceback's exception line, else the first line (Hydra prints config errors bare)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.split(":")[0].endswith(("Error", "Exception", "Interrupt"))]
    return (errors[-1:] or lines[:1] or ["(no stderr)"])[0][:500]


def estimated_states_mb(b) -> dict[str, float]:
    """Analytic params + grads + optimizer + frozen per rank (fp32 on CPU, bf16-mixed on GPUs)."""
    cfg = compose_cli("memory", [f"model={b.model}"])
    counts = count_params(meta_model(build(cfg.model, "model")), "finetune", 1, [])
    precision = "32-true" if b.accelerator == "cpu" else "bf16-mixed"
    out = {}
    for s in b.strategies:
        if s in STRATEGIES:
            parts = model_states(counts, s, b.devices, precision)
            out[s] = round(sum(v for k, v in parts.items() if k != "host") / 2**20, 1)
    return out


def prepare_data(b, out: Path) -> None:
    """Generate the runs' synthetic data and tokenizer once, here, so no run's peak memory includes it."""
    cfg = compose_cli("train", train_overrides(b, "ddp", out / "prepare"))
    build_data(build(cfg.model, "model"), build(cfg.data, "data"), cfg.paths.data_dir, cfg.seed)


def run_bench_strategies(argv: list[str] | None = None) -> tuple[list[dict], Path]:
    b = compose_cli("bench_strategies", argv).bench_strategies
    if not b.strategies:
        raise ValueError("bench_strategies.strategies is empty")
    if b.devices < 2 or b.steps <= b.warmup_steps:
        raise ValueError(f"need devices >= 2 and steps > warmup_steps (got devices={b.devices}, steps={b.steps}, warmup_steps={b.warmup_steps})")
    out = Path(b.out) / time.strftime("%Y%m%d-%H%M%S")
    estimates = estimated_states_mb(b)
    prepare_data(b, out)
    rows = []
    for strategy in b.strategies:
        row = run_one(b, strategy, out / strategy)
        row["estimated_states_mb"] = estimates.get(strategy)
        rows.append(row)
        print(f"{strategy}: " + ("ok" if row["ok"] else f"FAILED {row['error']}"), file=sys.stderr, flush=True)
    results = {"config": OmegaConf.to_container(b, resolve=True), "cpu_count": os.cpu_count(),
               "load_average": os.getloadavg(), "rows": rows}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(rows), file=sys.stderr)
    print(f"results: {out / 'results.json'}", file=sys.stderr)
    return rows, out / "results.json"


def table(rows: list[dict]) -> str:
    lines = ["| strategy | peak memory per rank (MB) | at train start (MB) | mean step (ms) | analytic model states per rank (MB) | status |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        mem = " / ".join(f"{x['peak_memory_mb']:.0f}" for x in r["ranks"]) or "-"
        start = " / ".join(f"{x['rss_train_start_mb']:.0f}" for x in r["ranks"] if x["rss_train_start_mb"] is not None) or "-"
        step = f"{r['mean_step_ms']:.0f}" if r["mean_step_ms"] is not None else "-"
        est = f"{r['estimated_states_mb']:.0f}" if r.get("estimated_states_mb") is not None else "-"
        lines.append(f"| {r['strategy']} | {mem} | {start} | {step} | {est} | {'ok' if r['ok'] else r['error']} |")
    return "\n".join(lines)


def main() -> None:
    rows, _ = run_bench_strategies()
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
