"""`RankStats`: each rank writes its own peak memory and training-step times to `<out_dir>/rank<r>.json`.

Lightning logs from rank 0 only, and per-rank memory is exactly what distinguishes strategies, so
`python -m train bench_strategies` adds this callback (`callbacks=strategy_bench`) and reads the files.
A step is timed from `on_train_batch_start` to `on_train_batch_end`: forward, backward, gradient
reduction and optimizer step (data loading excluded). Memory: CUDA peak allocated on GPUs, else the
process's peak resident set size (`train.callbacks.peak_memory_mb`), plus the resident size when
training starts (after the strategy set the model up, before the first optimizer step).
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from ..callbacks import peak_memory_mb


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


class RankStats(L.Callback):
    def __init__(self, out_dir: str, warmup_steps: int = 2):
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.out_dir, self.warmup_steps = Path(out_dir), warmup_steps
        self.step_s: list[float] = []
        self._t = 0.0
        self._start_mb = None

    def on_train_start(self, trainer, module):
        self._start_mb = current_rss_mb()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_s.append(time.perf_counter() - self._t)

    def on_train_end(self, trainer, module):
        timed = self.step_s[self.warmup_steps :]
        stats = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "device": str(module.device),
            "threads": torch.get_num_threads(),
            "peak_memory_mb": round(peak_memory_mb(module.device), 1),
            "memory_kind": "cuda_max_allocated" if module.device.type == "cuda" else "peak_rss",
            "rss_train_start_mb": None if self._start_mb is None else round(self._start_mb, 1),
            "steps": len(self.step_s),
            "warmup_steps": self.warmup_steps,
            "mean_step_ms": round(1e3 * statistics.fmean(timed), 1) if timed else None,
            "step_ms": [round(1e3 * s, 1) for s in self.step_s],
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(stats, indent=2))
