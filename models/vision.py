"""Vision tower: an HF CLIP or SigLIP vision model, run only as deep as the LLaVA feature layer.

LLaVA-1.5 reads the penultimate layer, so the last encoder layer (and the post-layernorm) never
influences the LLM; running it anyway, as `LlavaForConditionalGeneration` does, wastes 1/L of the
tower. We run the HF modules ourselves and stop at the feature layer.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from .config import MLLMConfig
from .gathered import gathered, hf_from_config


def build_vision_tower(config: PretrainedConfig) -> nn.Module:
    """The HF vision model (`CLIPVisionModel` / `SiglipVisionModel`); its weight names are HF's."""
    return hf_from_config(config)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions (MAE): the first half of the channels encodes the patch row,
    the second half its column, each as sines and cosines over geometric frequencies. `[grid*grid, dim]`."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a vision hidden_size divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for coord in (rows.flatten(), cols.flatten()):
        angle = coord[:, None].double() * omega[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()


@torch.no_grad()
def init_sincos_positions(tower: nn.Module, grid: int) -> None:
    """Start a randomly initialised tower's (learned) patch positions from `sincos_2d` (the CLS row,
    CLIP only, keeps its init). Trained from scratch, a tower then knows where each patch is from
    step 0 instead of learning it, which speeds up every place-based skill of small models."""
    table = tower.embeddings.position_embedding.weight
    with gathered([table]), torch.no_grad():
        table[table.shape[0] - grid * grid :] = sincos_2d(grid, table.shape[1]).to(table)


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
