"""Causal attention inside packed rows: every sample of a row attends only to itself.

A packed row (data/packing.py) holds several samples one after the other. Each token carries the
sequence order of its sample's first token (`Stream.start`), so "same sample and causal" is
`start[q] <= order[k] <= order[q]`: no per-key sample id is needed, and a key of another sample is
never visible. Two kernels compute it on a causally sorted sequence (`sequence_order`):

* `sdpa`: SDPA with a dense block-diagonal causal mask [B, 1, N, N]. It runs everywhere (the CPU
  path and the reference), but costs N^2 scores per row, not the sum of the samples' squares.
* `varlen`: torch's `torch.nn.attention.varlen.varlen_attn` (FlashAttention-2 on CUDA, fp16/bf16)
  on the valid tokens flattened to [T, H, dh] with cumulative sample lengths, which computes only
  each sample's own causal triangle. It has no CPU kernel; untested on a GPU in this repository.

`model.attention` chooses (`auto`: varlen for CUDA fp16/bf16 tensors, sdpa otherwise).

Token selections, pooling and drops gather `start` with the tokens they keep, so the boundaries of a
call are always those of the tokens present; varlen's offsets are recomputed from them in every call
(one device-to-host sync for the longest sample).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import sdpa

BACKENDS = ("auto", "sdpa", "varlen")


def choose_backend(requested: str, device_type: str, dtype: torch.dtype) -> str:
    """The kernel packed causal attention runs with for tensors on `device_type` in `dtype`."""
    if requested not in BACKENDS:
        raise ValueError(f"model.attention must be one of {BACKENDS}, got {requested!r}")
    half = dtype in (torch.float16, torch.bfloat16)
    if requested == "varlen" and not (device_type == "cuda" and half):
        raise ValueError(f"model.attention=varlen needs CUDA fp16/bf16 tensors (torch's varlen_attn has no other kernel), "
                         f"got {device_type} {dtype}; use model.attention=auto or sdpa")
    if requested == "auto":
        return "varlen" if device_type == "cuda" and half else "sdpa"
    return requested


def block_causal_mask(order: Tensor, start: Tensor, valid: Tensor) -> Tensor:
    """[B, 1, N, N] bool: query i may read key j of its own sample at or before it. Padding queries
    read everything (their outputs are never used; an empty row would give NaNs)."""
    k_order = order[:, None, :]
    allowed = valid[:, None, :] & (k_order <= order[:, :, None]) & (k_order >= start[:, :, None])
    return (allowed | ~valid[:, :, None])[:, None]


def sample_offsets(start: Tensor, valid: Tensor) -> tuple[Tensor, int]:
    """Cumulative lengths [n_samples + 1] (int32) of the samples of causally sorted rows, taken over
    the valid tokens flattened row by row, and the longest sample (a host int: one sync)."""
    b, n = start.shape
    rows = torch.arange(b, device=start.device)[:, None].expand(b, n)
    sample = (rows * n + start)[valid]  # start < n: a distinct id per (row, sample)
    lengths = torch.unique_consecutive(sample, return_counts=True)[1]
    offsets = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return offsets, int(lengths.max()) if lengths.numel() else 0


def varlen_causal(q: Tensor, k: Tensor, v: Tensor, scale: float, start: Tensor, valid: Tensor) -> Tensor:
    """`varlen_attn` over each sample's own causal triangle; q [B, H, N, dh], k/v [B, Hkv, N, dh]
    sorted causally (padding last); padding outputs are zero."""
    from torch.nn.attention.varlen import varlen_attn

    b, h, n, dh = q.shape
    offsets, longest = sample_offsets(start, valid)
    flat = valid.flatten()

    def packed(x: Tensor) -> Tensor:
        return x.transpose(1, 2).reshape(b * n, x.shape[1], dh)[flat]

    out = varlen_attn(packed(q), packed(k), packed(v), offsets, offsets, longest, longest, scale=scale,
                      window_size=(-1, 0), enable_gqa=k.shape[1] != h)
    full = q.new_zeros(b * n, h, dh)
    full[flat] = out.to(q.dtype)
    return full.view(b, n, h, dh).transpose(1, 2)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, order: Tensor, valid: Tensor, start: Tensor | None,
                     backend: str = "auto") -> Tensor:
    """Causal self-attention of causally sorted tokens (padding last): plain `is_causal` SDPA for
    unpacked rows (`start` None), each sample within itself for packed rows."""
    if start is None:
        return sdpa(q, k, v, scale, causal=True)
    if choose_backend(backend, q.device.type, q.dtype) == "varlen":
        return varlen_causal(q, k, v, scale, start, valid)
    return sdpa(q, k, v, scale, mask=block_causal_mask(order, start, valid))
