"""Projectors from vision features to the LLM embedding space: LLaVA-1.5's 2-layer GELU MLP, MobileVLM V2's LDPv2."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn


class Projector(nn.Module):
    """`mlp2x_gelu` keeps HF `LlavaMultiModalProjector` weight names (linear_1, linear_2) so llava-hf
    checkpoints load unchanged; `linear` (LLaVA-1.0) has `linear_1` only."""

    def __init__(self, kind: str, vision_dim: int, text_dim: int):
        super().__init__()
        self.kind = kind
        self.linear_1 = nn.Linear(vision_dim, text_dim)
        if kind == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(text_dim, text_dim)
        elif kind != "linear":
            raise ValueError(f"unknown projector {kind!r} (expected 'mlp2x_gelu' or 'linear')")

    def forward(self, features):
        h = self.linear_1(features)
        if self.kind == "mlp2x_gelu":
            h = self.linear_2(self.act(h))
        return h


LDPV2_GRID = 12  # MobileVLM V2's LDPv2 pools every image to a 12 x 12 grid (144 tokens)


class LDPv2(nn.Module):
    """MobileVLM V2's lightweight downsample projector (`ldpnetv2`, arXiv 2402.03766): a Linear-GELU-Linear
    on every tower token, an adaptive average pool of the g x g token grid to `LDPV2_GRID` x `LDPV2_GRID`,
    and a positional-encoding generator (PEG: a depthwise 3 x 3 convolution, zero-padded) added back.
    Tokens go in and come out in raster order. The original weight names (`mlp.mlp.0`, `mlp.mlp.2`,
    `peg.peg.0`) are the original layout's (models/original_layout.py); these are LLaVA's `linear_1`,
    `linear_2` and `peg`."""

    def __init__(self, vision_dim: int, text_dim: int, grid: int = LDPV2_GRID):
        super().__init__()
        self.grid = grid
        self.linear_1 = nn.Linear(vision_dim, text_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_dim, text_dim)
        self.peg = nn.Conv2d(text_dim, text_dim, 3, padding=1, groups=text_dim)

    def pool(self, tokens):
        """[N, g*g, c] raster-ordered tokens -> [N, grid*grid, c] (adaptive average pooling of the g x g grid)."""
        n, t, c = tokens.shape
        g = math.isqrt(t)
        if g * g != t:
            raise ValueError(f"LDPv2 pools a square grid of tokens, got {t} per image")
        pooled = F.adaptive_avg_pool2d(tokens.transpose(1, 2).reshape(n, c, g, g), self.grid)
        return pooled.flatten(2).transpose(1, 2)

    def forward(self, features):
        h = self.pool(self.linear_2(self.act(self.linear_1(features))))  # [N, grid*grid, d]
        n, t, d = h.shape
        grid = h.transpose(1, 2).reshape(n, d, self.grid, self.grid)
        return (grid + self.peg(grid)).flatten(2).transpose(1, 2)
