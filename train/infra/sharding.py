"""What parameter-sharding strategies need from the model, in one place.

- ZeRO-3 (`strategy=deepspeed_zero3*`): every weight of each of the model's `gathered_units()` (the
  decoder layers) is registered as an external parameter of that unit, so the whole set is gathered
  around the unit's forward and backward (the plan reads head and FFN slices of weights directly,
  which per-submodule gathering would miss). DeepSpeed's leaf modules would do the same but reduce gradients in a module backward
  hook, which only sees top-level tensor arguments, not our streams.
- FSDP2 (`strategy=fsdp`, Lightning's ModelParallelStrategy): each of the model's `shard_units()`
  (decoder layers, vision encoder layers) is a `fully_shard` unit, the rest of the model the root unit; `decode_step` (and
  each decoder layer's `decode`) is registered as a forward method so generation unshards too.
- Export: `full_state_dict` assembles the full weights (a collective: every rank calls it).
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy
from torch import nn

from models.gathered import gathered, load_state_dict


def is_zero3(strategy: L.pytorch.strategies.Strategy) -> bool:
    return isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3


def excludes_frozen_weights(strategy) -> bool:
    return isinstance(strategy, DeepSpeedStrategy) and strategy.exclude_frozen_parameters


def offloads_optimizer(strategy) -> bool:
    return isinstance(strategy, DeepSpeedStrategy) and bool(strategy.config["zero_optimization"].get("offload_optimizer"))


def shards_parameters(strategy) -> bool:
    return is_zero3(strategy) or isinstance(strategy, ModelParallelStrategy)


def prepare_model(model: nn.Module, strategy) -> None:
    """Called from `configure_model`, after the model is built and its trainable parts are set."""
    if is_zero3(strategy):
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        for unit in model.gathered_units():
            for p in unit.parameters():
                register_external_parameter(unit, p)
    elif isinstance(strategy, ModelParallelStrategy):
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        mesh = strategy.device_mesh["data_parallel"]
        for unit in model.shard_units():
            fully_shard(unit, mesh=mesh)
            if hasattr(unit, "decode"):  # decoder layers: generation's decode step calls this, not forward
                register_fsdp_forward_method(unit, "decode")
        fully_shard(model, mesh=mesh)
        register_fsdp_forward_method(model, "decode_step")


def full_state_dict(model: nn.Module, strategy) -> dict[str, torch.Tensor] | None:
    """The full weights on CPU on rank 0 (None elsewhere); every rank must call this."""
    if isinstance(strategy, ModelParallelStrategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if strategy.global_rank == 0 else None
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        with gathered([t], modify=False):  # a no-op for unpartitioned tensors
            if strategy.global_rank == 0:
                out[name] = t.detach().cpu().clone()
    return out if strategy.global_rank == 0 else None


def load_zero3_weights(model: nn.Module, checkpoint_dir: str) -> None:
    """Put the trained weights of a ZeRO-3 checkpoint directory into the live (partitioned) model.

    Lightning restores ZeRO-3 checkpoints only into a training engine; `trainer.validate` builds an
    inference engine that cannot load them. So the best checkpoint's fp32 weights are assembled from
    its shards (on every rank: CPU memory for one full copy) and copied in, rank 0's copy counting."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag="checkpoint")
    state = {k.removeprefix("model."): v for k, v in state.items()}
    _, unexpected = load_state_dict(model, state)
    if unexpected:
        raise ValueError(f"{checkpoint_dir} holds weights this model does not have: {unexpected[:5]}")
