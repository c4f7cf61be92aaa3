"""Projector from vision features to the LLM embedding space (LLaVA-1.5: 2-layer GELU MLP)."""

from __future__ import annotations

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
