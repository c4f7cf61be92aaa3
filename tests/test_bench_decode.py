"""`python -m train bench_decode`: a row per plan, runner and batch, transformers' generate beside ours.
(Timings themselves are benchmarks, never asserted.)"""

import json

import pytest

from train.tools.bench_decode import run_bench_decode


def test_bench_decode_rows_and_results_file(tmp_path):
    rows = run_bench_decode(["vica"], ["model=tiny", "bench_decode.batches=[2]", "bench_decode.new_tokens=3", "bench_decode.repeats=1",
                                       "bench_decode.backend=aot_eager", f"bench_decode.out={tmp_path}"])
    assert [(r["arch"], r["runner"]) for r in rows] == [("dense", "ours"), ("dense", "ours_compiled"), ("vica", "ours"),
                                                        ("vica", "ours_compiled"), ("dense", "hf_generate")]
    for r in rows:
        assert r["batch"] == 2 and r["new_tokens"] == 3 and r["decode_ms_per_step"] > 0
        assert r["tokens_per_s"] == pytest.approx(2 * 1e3 / r["decode_ms_per_step"], rel=1e-3)
    (results,) = tmp_path.glob("decode-tiny-cpu-*.json")
    assert json.loads(results.read_text())["rows"] == rows
