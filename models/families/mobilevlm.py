"""MobileVLM V2 (arXiv 2402.03766, Meituan-AutoML/MobileVLM): LLaVA-1.5's CLIP tower (penultimate layer,
CLS dropped) and a Llama LLM (MobileLLaMA), joined by the LDPv2 projector (`ldpnetv2`,
models/projector.py): a Linear-GELU-Linear per tower token, an adaptive average pool of the token grid to
12 x 12 and a depthwise 3 x 3 convolution added back. Every image is 144 visual tokens on one 12 x 12 grid
(`Place` ROW / COL), so pooling, uniform lattices and local windows work on that grid; a tower score a
pre-LLM step reads (dominance, CLS similarity) is pooled to it the same way as the tokens.

There is no transformers class: checkpoints are the original LLaVA layout (`model_type` `mobilevlm`,
`MobileLlamaForCausalLM`, weights `model.mm_projector.mlp.mlp.0.*`, ..., the tower in a CLIP directory;
models/original_layout.py), which `save_pretrained` writes and `from_pretrained` reads. Everything else is
LLaVA-1.5's (pad-to-square preprocessing, the tower's modules and checks).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import LlavaConfig

from ..config import MLLMConfig
from ..family import VisualTokens, grid_place, register
from ..gathered import hf_from_config
from ..original_layout import to_internal, to_original
from ..projector import LDPV2_GRID, LDPv2
from ..validation import ConfigError
from ..vision import tower_features
from ..vision_flops import mlp_flops, tower_flops
from .llava import LlavaFamily


class MobileVLMConfig(LlavaConfig):
    """LLaVA's config under MobileVLM's model_type: the in-memory form the original layout's flat
    config.json is written from (models/original_layout.py:flat_config)."""

    model_type = "mobilevlm"


@register
class MobileVLMFamily(LlavaFamily):
    name = "mobilevlm"
    hf_model_type = "mobilevlm"
    hf_architecture = "MobileLlamaForCausalLM"  # MobileVLM's own class (its code, not transformers)
    text_types = {"llama": "llama"}
    original_layout = True

    # --- configuration ------------------------------------------------------------------------
    def validate(self, config: MLLMConfig) -> None:
        self.validate_tower(config)
        if config.projector != "ldpnetv2":
            raise ConfigError(f"model.config.family=mobilevlm takes MobileVLM V2's LDPv2 projector (model.config.projector=ldpnetv2), "
                              f"got {config.projector!r}; LLaVA's projectors are model.config.family=llava")
        if config.has_cls and config.vision_feature_select_strategy == "full":
            raise ConfigError("LDPv2 pools the tower's patch grid, and the CLS token that vision_feature_select_strategy=full keeps "
                              "is on no grid: use vision_feature_select_strategy=default")
        if config.grid_size < LDPV2_GRID:
            raise ConfigError(f"LDPv2 pools the tower's {config.grid_size} x {config.grid_size} patch grid to {LDPV2_GRID} x "
                              f"{LDPV2_GRID}: the tower needs image_size / patch_size >= {LDPV2_GRID}")
        if config.max_tiles is not None or config.image_grid_pinpoints is not None:
            raise ConfigError("MobileVLM V2 takes one image as one tower-sized square: unset model.max_tiles / image_grid_pinpoints")

    def hf_config(self, config: MLLMConfig):
        return MobileVLMConfig(**self.hf_config_fields(config), image_seq_length=LDPV2_GRID**2)

    # --- modules and weights --------------------------------------------------------------------
    def build(self, model) -> None:
        vision = model.config.hf_vision_config()
        model.vision_tower = hf_from_config(vision)
        model.multi_modal_projector = LDPv2(vision.hidden_size, model.text_config.hidden_size)

    def to_internal_name(self, key: str) -> str:
        return to_internal(key, "ldpnetv2")

    def to_hub_name(self, key: str) -> str:
        return to_original(key, "ldpnetv2")

    # --- visual tokens --------------------------------------------------------------------------
    def tokens_per_image(self, config: MLLMConfig, size: tuple[int, int] | None = None) -> int:
        return LDPV2_GRID**2

    def image_places(self, config: MLLMConfig, size: tuple[int, int] | None = None) -> Tensor:
        return grid_place(LDPV2_GRID, LDPV2_GRID)

    def encode(self, model, pixel_values: Tensor, image_sizes: Tensor | None, scores: str | None = None,
               sizes: list[tuple[int, ...]] | None = None) -> VisualTokens:
        projector = model.multi_modal_projector
        with model.tower_grad():
            features, score = tower_features(model.vision_tower, pixel_values, model.config, scores)
        h = projector(features)  # [N, 144, d]
        n, n_v, _ = h.shape
        place = grid_place(LDPV2_GRID, LDPV2_GRID, device=h.device).repeat(n, 1)
        counts = torch.full((n,), n_v, dtype=torch.long, device=h.device)
        if score is not None:  # a token's score: the mean of the patches its pooling window covers
            score = projector.pool(score.float()[..., None])[..., 0]
        return VisualTokens(h.reshape(n * n_v, -1), place, counts, None, None if score is None else {scores: score.reshape(-1)})

    def vision_flops(self, config: MLLMConfig, size: tuple[int, int]) -> dict[str, int]:
        """The tower on the padded, resized image; the projector's MLP on every patch, then the PEG's
        depthwise 3 x 3 convolution on the 144 pooled tokens (the pooling itself is additions only)."""
        d_text = config.hf_text_config().hidden_size
        mlp = mlp_flops(config.grid_size**2, [config.hf_vision_config().hidden_size, d_text, d_text])
        return {"tower": tower_flops(config), "projector": mlp + 2 * LDPV2_GRID**2 * d_text * 9}

    def config_fields(self, hf: dict[str, Any]) -> dict[str, Any]:
        return super().config_fields(hf) | {"projector": "ldpnetv2"}
