"""`python -m train bench`: rows for every plan, dense first, ratios against dense, a results file.
(Timings themselves are benchmarks, never asserted.)"""

import json

import pytest

from train.tools.bench import run_bench, split_arch_list

TINY = ["model=tiny", "bench.batch=1", "bench.n_text=8", "bench.new_tokens=2", "bench.warmup=0", "bench.repeats=1"]


def test_arch_list_parsing():
    assert split_arch_list(["arch=vica,shortv", "bench.batch=2"]) == (["vica", "shortv"], ["bench.batch=2"])
    assert split_arch_list(["arch=[vica,pdrop]"]) == (["[vica,pdrop]"], [])
    assert split_arch_list([]) == (["dense"], [])


def test_bench_rows_and_results_file(tmp_path):
    rows = run_bench(["vica", "fastv"], [*TINY, "bench.n_visual=16", f"bench.out={tmp_path}"])
    assert [r["arch"] for r in rows] == ["dense", "vica", "fastv"]
    keys = {"arch", "batch", "n_visual", "n_text", "prefill_ms", "train_step_ms", "decode_ms_per_token", "flops_ratio", "time_ratio"}
    for r in rows:
        assert set(r) == keys and r["n_visual"] == 16 and r["n_text"] == 8
        assert r["prefill_ms"] > 0 and r["train_step_ms"] > 0 and r["decode_ms_per_token"] > 0
    assert rows[0]["flops_ratio"] == rows[0]["time_ratio"] == 1.0
    assert 0 < rows[1]["flops_ratio"] < rows[2]["flops_ratio"] < 1  # ViCA skips more than FastV R=50%
    (results,) = tmp_path.glob("bench-*.json")
    assert json.loads(results.read_text())["rows"] == rows


def test_bench_rejects_a_non_square_token_count(tmp_path):
    with pytest.raises(ValueError, match="bench.n_visual=15 must be a square number"):
        run_bench(["dense"], [*TINY, "bench.n_visual=15", f"bench.out={tmp_path}"])
