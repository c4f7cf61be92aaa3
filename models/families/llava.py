"""LLaVA-1.5 (arXiv 2310.03744): a CLIP or SigLIP tower read at its feature layer, an MLP projector,
a Llama or Qwen2 LLM; every image is one square grid of `(image_size / patch_size)^2` tokens
(plus CLIP's CLS with `vision_feature_select_strategy=full`), padded to a square with the mean
colour and resized before the tower (`image_aspect_ratio: pad`).

Checkpoints are llava-hf's format (`LlavaForConditionalGeneration`): we write the Hub names
(`language_model.model.*`, `language_model.lm_head.*`, `vision_tower.vision_model.*`,
`multi_modal_projector.*`), which every transformers version loads, and read those, the
transformers-v5 in-memory names (`model.language_model.*`, ...) and v5's flattened vision names.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from transformers import LlavaConfig

from ..config import MLLMConfig, square_side
from ..family import register
from ..validation import ConfigError
from ..family import Family, ImageProcessor, ProcessedImage, VisualTokens, grid_place
from ..gathered import gathered, hf_from_config
from ..projector import Projector
from ..streams import Place
from ..vision import tower_features
from ..vision_flops import mlp_flops, tower_flops

# (ours, on disk) prefix pairs; order matters for the first match on load.
SAVE_PREFIXES = [
    ("vision_tower.", "vision_tower.vision_model."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
]
LOAD_PREFIXES = [
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.vision_model.", "vision_tower."),
]


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new("RGB", (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def normalise(img: Image.Image, mean, std) -> Tensor:
    """`[3, H, W]` float tensor of an RGB image, normalised like the vision tower expects."""
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


class PadToSquare(ImageProcessor):
    """LLaVA-1.5's preprocessing: pad to a square with the mean colour, resize (bicubic) to the
    tower's `size`, normalise. PIL + numpy only (torchvision is not a dependency)."""

    def __init__(self, size: int, mean, std):
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)

    def __call__(self, image: Image.Image) -> ProcessedImage:
        original = (image.height, image.width)
        img = expand_to_square(image, tuple(int(255 * m) for m in self.mean))
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return ProcessedImage(normalise(img, self.mean, self.std), original)


def rename(key: str, pairs: list[tuple[str, str]]) -> str:
    for src, dst in pairs:
        if key.startswith(src):
            return dst + key[len(src) :]
    return key


@register
class LlavaFamily(Family):
    name = "llava"
    hf_model_type = "llava"
    hf_architecture = "LlavaForConditionalGeneration"
    vision_types = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
    text_types = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe"}

    # --- configuration ------------------------------------------------------------------------
    def validate(self, config: MLLMConfig) -> None:
        self.validate_tower(config)
        if config.projector == "ldpnetv2":
            raise ConfigError("model.config.projector=ldpnetv2 is MobileVLM V2's projector: set model.config.family=mobilevlm")
        if config.max_tiles is not None:
            raise ConfigError("model.max_tiles tiles images InternVL's way: set model.family=internvl")
        self.validate_grid(config)

    def validate_tower(self, config: MLLMConfig) -> None:
        """Feature selection and the feature layer (the checks every LLaVA-style family shares)."""
        vision = config.hf_vision_config()
        if config.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError("model.vision_feature_select_strategy must be 'default' (drop CLS) or 'full'")
        if config.vision_family == "siglip" and config.vision_feature_select_strategy == "default":
            raise ConfigError(
                "SigLIP has no CLS token, so vision_feature_select_strategy='default' would drop a real "
                "patch; set model.vision_feature_select_strategy=full"
            )
        n_layers = vision.num_hidden_layers
        if not -n_layers <= config.vision_feature_layer <= n_layers or config.vision_feature_layer == -n_layers - 1:
            raise ConfigError(
                f"model.vision_feature_layer={config.vision_feature_layer} is outside the vision tower's "
                f"{n_layers} layers (use -1..-{n_layers} or 0..{n_layers})"
            )
        if config.tile_size % square_side(vision.patch_size):
            raise ConfigError(f"vision image_size {vision.image_size} is not a multiple of patch_size {vision.patch_size}")

    def validate_grid(self, config: MLLMConfig) -> None:
        if config.image_grid_pinpoints is not None:
            raise ConfigError("model.image_grid_pinpoints tiles images (LLaVA-NeXT's anyres): set model.family=llava_next")

    def hf_config(self, config: MLLMConfig):
        return LlavaConfig(**self.hf_config_fields(config), image_seq_length=config.num_image_tokens)

    def hf_config_fields(self, config: MLLMConfig) -> dict[str, Any]:
        """The fields LLaVA's config classes share."""
        return dict(
            vision_config=config.hf_vision_config().to_dict(),
            text_config=config.hf_text_config().to_dict(),
            image_token_index=config.image_token_id,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            projector_hidden_act="gelu",
            tie_word_embeddings=config.hf_text_config().tie_word_embeddings,
        )

    def config_fields(self, hf: dict[str, Any]) -> dict[str, Any]:
        feature_layer = hf.get("vision_feature_layer", -2)
        if not isinstance(feature_layer, int):
            raise ConfigError(f"multi-layer vision_feature_layer {feature_layer} is not supported")
        return dict(
            vision_feature_layer=feature_layer,
            vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
            image_token_id=hf.get("image_token_index", hf.get("image_token_id")),
        )

    # --- modules and weights --------------------------------------------------------------------
    def build(self, model) -> None:
        config = model.config
        vision = config.hf_vision_config()
        model.vision_tower = hf_from_config(vision)
        model.multi_modal_projector = Projector(config.projector, vision.hidden_size, model.text_config.hidden_size)

    def init_weights(self, model) -> None:
        """The projector starts like LLaVA's (normal weights at the LLM's initializer_range, zero biases)."""
        projector = model.multi_modal_projector
        for m in (projector.linear_1, getattr(projector, "linear_2", None)):
            if m is not None:
                with gathered(m.parameters()):
                    nn.init.normal_(m.weight, std=model.text_config.initializer_range)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def to_internal_name(self, key: str) -> str:
        if key.startswith("model."):
            key = key[len("model.") :]
        return rename(key, LOAD_PREFIXES)

    def to_hub_name(self, key: str) -> str:
        return rename(key, SAVE_PREFIXES)  # our own extra modules (gated cross-attention blocks) keep their names

    def dropped_on_load(self, key: str) -> bool:
        return key.startswith("vision_tower.head.")  # SigLIP's pooling head: never used by LLaVA-style models

    # --- visual tokens --------------------------------------------------------------------------
    def tokens_per_image(self, config: MLLMConfig, size: tuple[int, int] | None = None) -> int:
        keep_cls = config.has_cls and config.vision_feature_select_strategy == "full"
        return config.grid_size**2 + int(keep_cls)

    def grid_places(self, config: MLLMConfig, device=None) -> Tensor:
        """Places of one image's tokens: the g x g grid, after CLS (off the grid) when it is kept."""
        g = config.grid_size
        place = grid_place(g, g, device=device)
        if config.tokens_per_image() == g * g:
            return place
        cls = torch.zeros(1, len(Place), dtype=torch.long, device=device)
        cls[0, Place.ROW] = cls[0, Place.COL] = -1
        place[:, Place.PATCH] += 1
        return torch.cat([cls, place])

    def image_places(self, config: MLLMConfig, size: tuple[int, int] | None = None) -> Tensor:
        return self.grid_places(config)

    def encode(self, model, pixel_values: Tensor, image_sizes: Tensor | None, scores: str | None = None,
               sizes: list[tuple[int, ...]] | None = None) -> VisualTokens:
        with model.tower_grad():
            features, score = tower_features(model.vision_tower, pixel_values, model.config, scores)
        h = model.multi_modal_projector(features)  # [N, n_v, d]
        n, n_v, _ = h.shape
        place = self.grid_places(model.config, h.device).repeat(n, 1)
        counts = torch.full((n,), n_v, dtype=torch.long, device=h.device)
        return VisualTokens(h.reshape(n * n_v, -1), place, counts, None, None if score is None else {scores: score.reshape(-1)})

    def projector_widths(self, config: MLLMConfig) -> list[int]:
        """Widths of the projector's linear layers, from the tower's features to the LLM."""
        d_text = config.hf_text_config().hidden_size
        return [config.hf_vision_config().hidden_size, d_text] + ([d_text] if config.projector == "mlp2x_gelu" else [])

    def vision_flops(self, config: MLLMConfig, size: tuple[int, int]) -> dict[str, int]:
        """The tower on the one padded, resized image (up to the feature layer), the projector on its tokens."""
        return {"tower": tower_flops(config), "projector": mlp_flops(self.tokens_per_image(config), self.projector_widths(config))}

    # --- preprocessing --------------------------------------------------------------------------
    def image_processor(self, config: MLLMConfig) -> ImageProcessor:
        return PadToSquare(config.hf_vision_config().image_size, config.image_mean, config.image_std)

    # --- training and parallelism ---------------------------------------------------------------
    def vision_layers(self, model) -> list[nn.Module]:
        return list(model.vision_tower.encoder.layers)

    def unused_vision_modules(self, model) -> list[nn.Module]:
        tower = model.vision_tower
        return [*tower.encoder.layers[model.config.vision_layers_used :], tower.post_layernorm]
