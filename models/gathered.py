"""Reading and writing parameters that ZeRO-3 has partitioned across processes.

Under `deepspeed.zero.Init` (the model is built already sharded) each process holds a slice of every
parameter and `param.data` is empty outside the module's forward. Code that initialises or loads
weights must gather them first, and only one rank's writes may count so that all ranks agree. These
helpers are no-ops for ordinary parameters, so the model code reads the same either way.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


@contextmanager
def gathered(params: Iterable[nn.Parameter], modify: bool = True) -> Iterator[None]:
    """Full values of partitioned `params` inside the block. With `modify`, rank 0's writes are
    re-partitioned to every rank on exit (every rank must enter the block: it is a collective)."""
    sharded = [p for p in params if is_partitioned(p)]
    if not sharded:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(sharded, modifier_rank=0 if modify else None):
        yield


def load_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """`module.load_state_dict(state, strict=False)` that also fills partitioned parameters, one
    submodule's own parameters at a time (never the whole model gathered at once). Returns
    (missing, unexpected) keys."""
    if not any(is_partitioned(p) for p in module.parameters()):
        result = module.load_state_dict(state, strict=False)
        return list(result.missing_keys), list(result.unexpected_keys)
    seen: set[str] = set()
    for prefix, sub in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        own = {dot + n: p for n, p in sub.named_parameters(recurse=False)}
        own.update({dot + n: b for n, b in sub.named_buffers(recurse=False) if n not in sub._non_persistent_buffers_set})
        present = {k: t for k, t in own.items() if k in state}
        seen.update(own)
        if not present:
            continue
        with gathered([t for t in present.values() if isinstance(t, nn.Parameter)]), torch.no_grad():
            for k, t in present.items():
                t.data.copy_(state[k].to(t.dtype))
    missing = [k for k in module.state_dict() if k not in state]
    return missing, [k for k in state if k not in seen]


def zero_init_active() -> bool:
    """True inside `deepspeed.zero.Init` (parameters are partitioned as modules are created)."""
    if "deepspeed" not in sys.modules:  # never imported: no ZeRO-3 context can be open
        return False
    from deepspeed.runtime.zero import partition_parameters

    return partition_parameters.zero_init_context > 0


def hf_from_config(config, model_class=None) -> nn.Module:
    """`AutoModel.from_config` (or `model_class(config)`, for HF modules AutoModel does not map, such
    as Qwen2-VL's vision tower) that also works inside `deepspeed.zero.Init`: there HF's weight init
    would write into empty partitions, so construction skips it and transformers' ZeRO-3 initializer
    (each module's weights gathered in turn, rank 0 initialises) runs after."""
    from transformers import AutoModel

    build = model_class or AutoModel.from_config
    if not zero_init_active():
        return build(config)
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import initialize_weights_zero3

    with no_init_weights():
        model = build(config)
    initialize_weights_zero3(model)
    return model


def numel(p: torch.Tensor) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it (its local tensor is empty)."""
    return getattr(p, "ds_numel", p.numel())
