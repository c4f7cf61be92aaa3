"""Multi-process strategies: Lightning's own on GPUs, and the one small shim DeepSpeed needs on CPUs.

`conf/strategy/*.yaml` instantiate these. On CPU (tests, laptops, CI) DeepSpeed runs its ZeRO
partitioning over gloo; Lightning's `DeepSpeedStrategy` refuses non-CUDA accelerators and hands
DeepSpeed the root device's index as its device rank, which is None for `torch.device("cpu")`.
`CPUDeepSpeedStrategy` indexes the CPU devices by local rank (`torch.device("cpu", i)` is plain CPU
memory), which satisfies both, and otherwise is the stock strategy.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeed ZeRO with gloo on CPU processes (no CUDA-only checks, CPU devices indexed by rank)."""

    def setup_environment(self) -> None:
        assert self.parallel_devices is not None
        self.parallel_devices = [torch.device("cpu", i) for i in range(len(self.parallel_devices))]
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's override only adds the CUDA check


def deepspeed(stage: int, config: dict[str, Any] | None = None, **kwargs: Any) -> DeepSpeedStrategy:
    """ZeRO `stage` the Lightning way: the Trainer owns precision, clipping and accumulation; `config`
    merges extra DeepSpeed keys. Frozen parameters (e.g. the vision tower) stay out of checkpoints."""
    if stage == 3:
        raise NotImplementedError(
            "strategy=deepspeed_zero3: ZeRO-3 partitions parameters and gathers them in module forward "
            "hooks, but the plan-executing decoder reads projection weights directly (head and FFN "
            "slices), so it would see empty shards. Use strategy=deepspeed_zero2 or ddp for now."
        )
    kwargs.setdefault("exclude_frozen_parameters", True)
    if torch.cuda.is_available():
        strategy = DeepSpeedStrategy(stage=stage, **kwargs)
    else:
        kwargs.setdefault("process_group_backend", "gloo")
        strategy = CPUDeepSpeedStrategy(stage=stage, **kwargs)
    if config:
        strategy.config = _merge(strategy.config or {}, config)
    return strategy


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
