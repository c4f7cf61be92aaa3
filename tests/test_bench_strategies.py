"""`python -m train bench_strategies`: real 2-rank CPU runs, per-rank stats, failures reported per
strategy (timings are benchmarks, never asserted)."""

import json

import pytest

from train.tools.bench_strategies import last_error


def test_last_error_finds_the_exception_or_hydras_message():
    trace = "Traceback (most recent call last):\n  File x\nRuntimeError: boom\nwarning after\n"
    assert last_error(trace) == "RuntimeError: boom"
    assert last_error("In 'train': Could not find 'strategy/x'\nAvailable options\n") == "In 'train': Could not find 'strategy/x'"
    assert last_error("") == "(no stderr)"


@pytest.mark.slow
def test_strategy_benchmark_runs_ddp_and_reports_a_failing_strategy(tmp_path):
    from train.tools.bench_strategies import run_bench_strategies

    rows, path = run_bench_strategies([
        "bench_strategies.strategies=[ddp,no_such_strategy]", "bench_strategies.steps=2", "bench_strategies.warmup_steps=1",
        f"bench_strategies.out={tmp_path}", "bench_strategies.timeout_s=600"])
    assert json.loads(path.read_text())["rows"] == rows
    ddp, bad = rows
    assert ddp["ok"] and ddp["error"] is None and [r["rank"] for r in ddp["ranks"]] == [0, 1]
    for r in ddp["ranks"]:
        assert r["steps"] == 2 and len(r["step_ms"]) == 2 and r["mean_step_ms"] == r["step_ms"][1]
        assert r["peak_memory_mb"] >= r["rss_train_start_mb"] > 0 and r["memory_kind"] == "peak_rss"
    assert ddp["estimated_states_mb"] > 0
    assert not bad["ok"] and "no_such_strategy" in bad["error"] and bad["ranks"] == []
