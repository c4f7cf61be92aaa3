"""`python -m train bench_packing`: one row per arm, packing removes most padding, a results file.
(Timings are benchmarks, never asserted.)"""

import json

import pytest

from train.tools.bench_packing import run_bench_packing

TINY = ["bench_packing.samples=120", "bench_packing.steps=2", "bench_packing.warmup=0", "bench_packing.batch_size=6",
        "bench_packing.buffer_batches=4", "model.config.text.num_hidden_layers=1", "model.config.vision.num_hidden_layers=2"]


def test_rows_for_every_arm_and_a_results_file(tmp_path):
    rows, path = run_bench_packing([*TINY, f"bench_packing.out={tmp_path}"])
    assert [r["arm"] for r in rows] == ["padded", "grouped", "packed"]
    padded, grouped, packed = rows
    assert packed["padding_fraction"] < grouped["padding_fraction"] < padded["padding_fraction"]
    assert packed["samples_per_row"] > 1 and packed["rows_per_step"] < padded["rows_per_step"]
    assert all(r["tokens_per_s"] > 0 and r["step_ms"] > 0 for r in rows)
    assert json.loads(path.read_text())["rows"] == rows


def test_an_unknown_arm_is_refused(tmp_path):
    with pytest.raises(ValueError, match="bench_packing.arms must list some of"):
        run_bench_packing([*TINY, "bench_packing.arms=[padded,flat]", f"bench_packing.out={tmp_path}"])
