"""Multi-process strategies: Lightning's own on GPUs, and the small shims CPUs need.

`conf/strategy/*.yaml` instantiate these. On CPU (tests, laptops, CI) DeepSpeed runs its ZeRO
partitioning over gloo; Lightning's `DeepSpeedStrategy` refuses non-CUDA accelerators and hands
DeepSpeed the root device's index as its device rank, which is None for `torch.device("cpu")`.
`CPUDeepSpeedStrategy` indexes the CPU devices by local rank (`torch.device("cpu", i)` is plain CPU
memory), which satisfies both, and otherwise is the stock strategy. What the model itself needs
under ZeRO-3 / FSDP2 is in `train/infra/sharding.py`.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeed ZeRO with gloo on CPU processes (no CUDA-only checks, CPU devices indexed by rank)."""

    def setup_environment(self) -> None:
        assert self.parallel_devices is not None
        self.parallel_devices = [torch.device("cpu", i) for i in range(len(self.parallel_devices))]
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's override only adds the CUDA check


def deepspeed(stage: int, config: dict[str, Any] | None = None, **kwargs: Any) -> DeepSpeedStrategy:
    """ZeRO `stage` the Lightning way: the Trainer owns precision, clipping and accumulation; `config`
    merges extra DeepSpeed keys. Frozen parameters (e.g. the vision tower) stay out of checkpoints.
    Stage 3 builds the model already partitioned (`deepspeed.zero.Init` around `configure_model`)."""
    kwargs.setdefault("exclude_frozen_parameters", True)
    if torch.cuda.is_available():
        strategy = DeepSpeedStrategy(stage=stage, **kwargs)
    else:
        kwargs.setdefault("process_group_backend", "gloo")
        strategy = CPUDeepSpeedStrategy(stage=stage, **kwargs)
    if config:
        strategy.config = _merge(strategy.config or {}, config)
    return strategy


class FSDPStrategy(ModelParallelStrategy):
    """FSDP2 (per-parameter sharding, `fully_shard`) with every process of every node in one
    data-parallel dimension (Lightning's "auto" sizes would make the devices of a node a
    tensor-parallel group). The model is sharded in `configure_model` (train/infra/sharding.py)."""

    def setup_environment(self) -> None:
        self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()


def fsdp(**kwargs: Any) -> ModelParallelStrategy:
    """FSDP2; checkpoints are distributed (a directory with one shard per rank); NCCL on GPUs,
    gloo on CPUs (where ModelParallelStrategy works as shipped)."""
    if kwargs.get("process_group_backend") is None and not torch.cuda.is_available():
        kwargs["process_group_backend"] = "gloo"
    return FSDPStrategy(**kwargs)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
