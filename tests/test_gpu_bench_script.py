"""slurm/gpu_bench.sh, run with --tiny (tiny model, CPU, bf16): the GPU benchmark's plans, batch sizes and
HF comparison row all come out as results files, so the script is known to work before a GPU runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_script_on_the_tiny_model(tmp_path):
    env = {**os.environ, "EMLLM_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "slurm/gpu_bench.sh", "--tiny", str(tmp_path)], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(tmp_path.glob("bench-tiny-cpu-bf16-*.json"))
    assert len(files) == 2
    for path, batch in zip(sorted(files, key=lambda p: int(p.stem.split("-b")[-1].split("-")[0])), (1, 2)):
        rows = json.loads(path.read_text())["rows"]
        assert [r["arch"] for r in rows] == ["dense", "vica", "shortv", "vtw", "fastv", "pdrop", "hf_llava_sdpa"]
        assert all(r["batch"] == batch and r["prefill_ms"] > 0 and r["train_step_ms"] > 0 for r in rows)
        assert {"prefill_vs_hf", "train_step_vs_hf", "decode_vs_hf"} <= set(rows[0])
    assert "stopped early" not in (tmp_path / "log.txt").read_text()
