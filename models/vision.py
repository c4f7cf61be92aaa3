"""Vision tower: an HF CLIP or SigLIP vision model, run only as deep as the LLaVA feature layer.

LLaVA-1.5 reads the penultimate layer, so the last encoder layer (and the post-layernorm) never
influences the LLM; running it anyway, as `LlavaForConditionalGeneration` does, wastes 1/L of the
tower. We run the HF modules ourselves and stop at the feature layer.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig

from .config import MLLMConfig


def build_vision_tower(config: PretrainedConfig) -> nn.Module:
    """The HF vision model (`CLIPVisionModel` / `SiglipVisionModel`); its weight names are HF's."""
    return AutoModel.from_config(config)


def vision_hidden_states(tower: nn.Module, pixel_values: torch.Tensor, n_layers: int) -> torch.Tensor:
    """Hidden state after `n_layers` encoder layers (HF `hidden_states[n_layers]`)."""
    dtype = tower.embeddings.patch_embedding.weight.dtype
    h = tower.embeddings(pixel_values.to(dtype))
    if hasattr(tower, "pre_layrnorm"):  # CLIP normalises before the encoder
        h = tower.pre_layrnorm(h)
    for layer in tower.encoder.layers[:n_layers]:
        h = layer(h, None)
    return h


def image_features(tower: nn.Module, pixel_values: torch.Tensor, config: MLLMConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Patch features for the projector and the CLS feature (CLIP only, for CLS-similarity pruning).

    Returns `(features [B, n_v, d_vision], cls [B, d_vision] | None)`.
    """
    h = vision_hidden_states(tower, pixel_values, config.vision_layers_used)
    cls = h[:, 0] if config.has_cls else None
    if config.vision_feature_select_strategy == "default" and config.has_cls:
        h = h[:, 1:]
    return h, cls
