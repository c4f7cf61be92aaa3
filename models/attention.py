"""Attention over explicit query and key sets, with masks derived from original positions.

A layer attends from a set of query tokens to a set of key tokens that need not be the same
tokens (text-only queries over text+visual keys, cached keys at decode time, ...). Causality is
`key_pos <= query_pos`, so the order in which tokens are stored never matters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, N, dh]; cos/sin: [B, N, dh] (HF Llama/Qwen2 rotate-half convention)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def split_heads(x: Tensor, head_dim: int) -> Tensor:
    b, n, _ = x.shape
    return x.view(b, n, -1, head_dim).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    b, h, n, dh = x.shape
    return x.transpose(1, 2).reshape(b, n, h * dh)


@dataclass
class Keys:
    """Keys and values of one layer plus the per-key facts masks need; this is also the KV cache."""

    k: Tensor  # [B, Hkv, S, dh] (RoPE applied)
    v: Tensor  # [B, Hkv, S, dh]
    pos: Tensor  # [B, S]
    valid: Tensor  # [B, S]
    is_visual: Tensor  # [B, S]

    def append(self, other: "Keys") -> "Keys":
        return Keys(*(torch.cat([a, b], dim=2 if a.dim() == 4 else 1) for a, b in zip(self._t(), other._t())))

    def _t(self):
        return (self.k, self.v, self.pos, self.valid, self.is_visual)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


def causal_mask(q_pos: Tensor, q_valid: Tensor, keys: Keys) -> Tensor:
    """[B, 1, Q, S] boolean mask: valid keys at or before each query's position.

    Padding queries may attend to everything: their outputs are never read, and a fully masked row
    would produce NaNs that leak through 0 * NaN into real tokens.
    """
    allowed = keys.valid[:, None, :] & (keys.pos[:, None, :] <= q_pos[:, :, None])
    allowed = allowed | ~q_valid[:, :, None]
    return allowed[:, None]


def attend(q: Tensor, keys: Keys, mask: Tensor, scale: float) -> Tensor:
    """Scaled dot-product attention with grouped-query K/V; returns [B, H, Q, dh]."""
    n_rep = q.shape[1] // keys.k.shape[1]
    k, v = keys.k, keys.v
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
