"""Counting what a GPU would pay for, on any device: aten ops (a proxy of kernel launches) and host syncs.

Decode at small batch is launch-bound and every host sync stalls the queue, so both decide GPU speed,
and both are visible on a CPU. `count_dispatch()` runs a block under two modes at once:

* a `TorchDispatchMode` sees every aten op after autograd and decompositions: it counts ops by name, the
  kernels among them (ops that are neither views nor allocations) and the ops that make the host wait for a device (`SYNC_OPS`: `.item()` / `int()` / `bool()` reach
  `_local_scalar_dense`; `nonzero`, boolean-mask indexing, `masked_select`, `repeat_interleave` without
  `output_size`, `unique*`, `bincount` and `equal` size or return their result on the host);
* a `TorchFunctionMode` sees what never reaches aten on a CPU tensor: Python-level reads of tensor data
  (`tolist`, `numpy`, `__array__`, `.cpu()` / `.to("cpu")` of a device tensor) and tensors built from
  host data straight on a device (`torch.tensor(..., device=...)`: a blocking host-to-device copy on CUDA;
  on a CPU every explicit device counts, since that is where the model's device goes).

Each sync is recorded with the first stack frame in this repository or in transformers (`sites`), so
a failing test names the line to fix. tests/test_decoding.py and `python -m train bench_dispatch` use it.
"""

from __future__ import annotations

import traceback
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# aten op packet -> sync kind (op packets: every overload of the op)
SYNC_OPS = {
    aten._local_scalar_dense: "item",
    aten.nonzero: "nonzero",
    aten.argwhere: "nonzero",
    aten.masked_select: "masked_select",
    aten._unique: "unique",
    aten._unique2: "unique",
    aten.unique_dim: "unique",
    aten.unique_consecutive: "unique",
    aten.unique_dim_consecutive: "unique",
    aten.bincount: "bincount",  # CUDA sizes its output from max().item()
    aten.equal: "equal",
}
NO_KERNEL = {aten._unsafe_view, aten.empty, aten.empty_like, aten.new_empty, aten.empty_strided}  # besides views
INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}  # sync when an index is a mask
READS = {"tolist": "tolist", "numpy": "numpy", "__array__": "numpy"}  # Python-level reads of a tensor's data
ROOT = str(Path(__file__).resolve().parents[1])


@dataclass
class Census:
    """What a block ran: `ops` per aten op name, `kernels` the ops that launch work on a device (not views
    or allocations), `syncs` per kind, `sites` per kind: "file:line" counts."""

    ops: Counter = field(default_factory=Counter)
    kernels: int = 0
    syncs: Counter = field(default_factory=Counter)
    sites: dict[str, Counter] = field(default_factory=dict)

    @property
    def n_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def n_syncs(self) -> int:
        return sum(self.syncs.values())

    def note_sync(self, kind: str) -> None:
        self.syncs[kind] += 1
        self.sites.setdefault(kind, Counter())[call_site()] += 1

    def describe(self) -> str:
        """One line per sync site: kind, count, where."""
        return "\n".join(f"{kind} x{n} at {site}" for kind, sites in self.sites.items() for site, n in sites.most_common())


def call_site() -> str:
    """The innermost frame in this repository (or in transformers) outside this module: "path:line"."""
    frames = traceback.extract_stack()[:-3]
    for frame in reversed(frames):
        name = frame.filename
        if name == __file__ or "/torch/" in name:
            continue
        if "/transformers/" in name:  # wherever it is installed (a .venv inside this repository too)
            return f"{name[name.rindex('/transformers/') + 1 :]}:{frame.lineno}"
        if name.startswith(ROOT) and "/site-packages/" not in name:
            return f"{name[len(ROOT) + 1 :]}:{frame.lineno}"
    return "?"


def _sync_kind(func, args, kwargs) -> str | None:
    packet = func.overloadpacket
    kind = SYNC_OPS.get(packet)
    if kind is not None:
        return kind
    if func in (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor) and kwargs.get("output_size") is None:
        return "repeat_interleave"  # the output size is the repeats' sum, read on the host
    if packet in INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return "bool_index"
    return None


class _OpMode(TorchDispatchMode):
    def __init__(self, census: Census):
        super().__init__()
        self.census = census

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.census.ops[str(func.overloadpacket.__name__)] += 1
        self.census.kernels += not (func.is_view or func.overloadpacket in NO_KERNEL)
        kind = _sync_kind(func, args, kwargs)
        if kind is not None:
            self.census.note_sync(kind)
        return func(*args, **kwargs)


class _ReadMode(TorchFunctionMode):
    def __init__(self, census: Census):
        super().__init__()
        self.census = census

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in READS:
            self.census.note_sync(READS[name])
        elif name in ("cpu", "to") and args and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu" \
                and (name == "cpu" or _to_cpu(args[1:], kwargs)):
            self.census.note_sync("device_to_host")
        elif name in ("tensor", "as_tensor") and kwargs.get("device") is not None and not _is_tensor_data(args, kwargs):
            self.census.note_sync("host_to_device")
        return func(*args, **kwargs)


def _to_cpu(args, kwargs) -> bool:
    target = kwargs.get("device", args[0] if args else None)
    return isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"


def _is_tensor_data(args, kwargs) -> bool:
    data = args[0] if args else kwargs.get("data")
    return isinstance(data, torch.Tensor)


@contextmanager
def count_dispatch() -> Iterator[Census]:
    """Count the aten ops and host syncs of the block (see the module docstring)."""
    census = Census()
    with _ReadMode(census), _OpMode(census):
        yield census
