"""InternVL (transformers' `internvl` format: InternVL2.5 / InternVL3 `-hf` conversions): InternViT
over 448 px tiles, pixel shuffle 0.5, an LN + MLP projector, a Qwen2 or Llama LLM with 1-D RoPE.

An image of size (H, W) is resized to the canvas of `cols x rows` tiles whose aspect ratio is
closest to its own (transformers' `get_optimal_tiled_canvas`, 1 to `max_tiles` tiles) and cut
row-major; when it gives more than one tile, a resize of the whole image (the thumbnail) comes
last. Every tile goes through the tower; its CLS is dropped, the g x g patch grid is pixel-shuffled
(each 2 x 2 block becomes one token of 4x the width: HF's own `pixel_shuffle`) to (g/2) x (g/2)
and projected (`InternVLMultiModalProjector`). An image takes `tiles * (g/2)^2` context tokens in
the prompt, 256 per 448 px tile; the prompt writes them between the ordinary text tokens `<img>`
and `</img>` (transformers' `replace_image_token`), which the data path adds itself.

Each token's place: unit = its tile (row-major, the thumbnail last), row and column on the tile's
(g/2) x (g/2) grid. Tower scores (VisionZip's CLS attention, the CLS similarity) are per patch and
pooled to the pixel-shuffle units with the same `pixel_shuffle`: dominance sums a unit's four
patches, CLS similarity averages them.

Batches carry the tiles as the HF model takes them, `pixel_values` [sum tiles, 3, S, S], or padded
per image [n_images, max_tiles, 3, S, S] (our collator, `data/batch.py:collate_images`), with
`image_sizes` [n_images, 2] (height, width): each image's tile count follows from its size. Without
sizes (transformers' forward takes none) it follows from the image's placeholders, one run of
tiles * (g/2)^2 (`sizes_from_prompt`), and stands in for the size as [n_images, 1] tile counts. The
places need nothing more: a unit per tile, the thumbnail last whenever there is more than one; the
canvas's columns and rows are not a place, and no plan reads them.

Checkpoints: `InternVLForConditionalGeneration`'s config.json and weight names (`vision_tower.*`,
`multi_modal_projector.*`, `language_model.model.*`); preprocessing is transformers'
`GotOcr2ImageProcessorPil(crop_to_patches=True)`, the image processor of InternVL's processor.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import InternVLConfig
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil, get_optimal_tiled_canvas
from transformers.models.internvl.modeling_internvl import InternVLModel, InternVLMultiModalProjector

from ..config import MLLMConfig
from ..family import (ImageProcessor, ProcessedImage, VisualTokens, grid_place, normalisation, on_device, placeholder_runs, real_tiles, register,
                      tiles_by_image)
from ..gathered import hf_from_config
from ..validation import ConfigError
from ..vision import encoder_layers, tower_features
from ..vision_flops import mlp_flops, tower_flops
from .llava import LOAD_PREFIXES, LlavaFamily, rename

DEFAULT_MAX_TILES = 12  # GotOcr2ImageProcessor's max_patches, what InternVLProcessor uses
SAVE_PREFIXES = [
    ("vision_tower.", "vision_tower."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
]


def pixel_shuffle(grid: Tensor) -> Tensor:
    """[N, g, g, c] -> [N, g/2, g/2, 4c]: transformers' InternVL pixel shuffle (0.5), which uses no
    model state (called unbound so that the token order is exactly HF's)."""
    return InternVLModel.pixel_shuffle(None, grid, scale_factor=0.5)


class InternVLTiles(ImageProcessor):
    """transformers' `GotOcr2ImageProcessorPil` for one config: [tiles, 3, S, S] per image (the
    thumbnail last when there is more than one tile)."""

    def __init__(self, config: MLLMConfig):
        size = config.tile_size
        self.processor = GotOcr2ImageProcessorPil(
            size={"height": size, "width": size}, crop_to_patches=True, min_patches=1, max_patches=max_tiles(config),
            image_mean=list(config.image_mean), image_std=list(config.image_std),
        )

    def __call__(self, image: Image.Image) -> ProcessedImage:
        out = self.processor(images=[image.convert("RGB")], return_tensors="pt")
        return ProcessedImage(out["pixel_values"], (image.height, image.width))


def max_tiles(config: MLLMConfig) -> int:
    return DEFAULT_MAX_TILES if config.max_tiles is None else config.max_tiles


@register
class InternVLFamily(LlavaFamily):
    name = "internvl"
    hf_model_type = "internvl"
    hf_architecture = "InternVLForConditionalGeneration"
    vision_types = {"internvl_vision": "internvit"}
    text_types = {"qwen2": "qwen2", "llama": "llama", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe"}
    variable_tokens = True
    image_wrap = ("<img>", "</img>")  # transformers' InternVLProcessor: start_image_token, end_image_token
    hf_processor_class = "InternVLProcessor"

    # --- configuration ------------------------------------------------------------------------
    def validate(self, config: MLLMConfig) -> None:
        self.validate_tower(config)
        if config.image_grid_pinpoints is not None:
            raise ConfigError("model.image_grid_pinpoints is LLaVA-NeXT's tiling; InternVL tiles by model.max_tiles")
        if config.max_tiles is not None and (not isinstance(config.max_tiles, int) or config.max_tiles < 1):
            raise ConfigError(f"model.max_tiles must be a positive integer, got {config.max_tiles!r}")
        if config.vision_feature_select_strategy != "default":
            raise ConfigError("model.family=internvl drops InternViT's CLS before the pixel shuffle: set "
                              "vision_feature_select_strategy=default")
        if config.grid_size % 2:
            raise ConfigError(f"InternVL's pixel shuffle halves the tower's {config.grid_size} x {config.grid_size} patch grid: "
                              "pick vision image_size / patch_size even")
        if config.projector != "mlp2x_gelu":
            raise ConfigError("model.family=internvl has one projector (LayerNorm, Linear, GELU, Linear): set "
                              "model.projector=mlp2x_gelu")

    def hf_config(self, config: MLLMConfig):
        text = config.hf_text_config()
        return InternVLConfig(
            vision_config=config.hf_vision_config().to_dict(), text_config=text.to_dict(),
            image_token_id=config.image_token_id, image_seq_length=(config.grid_size // 2) ** 2, downsample_ratio=0.5,
            projector_hidden_act="gelu", vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy, tie_word_embeddings=text.tie_word_embeddings,
        )

    def config_fields(self, hf: dict[str, Any]) -> dict[str, Any]:
        if hf.get("downsample_ratio", 0.5) != 0.5 or hf.get("projector_hidden_act", "gelu") != "gelu":
            raise ConfigError(f"InternVL checkpoint with downsample_ratio={hf.get('downsample_ratio')} and projector_hidden_act="
                              f"{hf.get('projector_hidden_act')!r}: only 0.5 and 'gelu' (every released InternVL) are supported")
        fields = super().config_fields(hf)
        fields["vision_feature_layer"] = hf.get("vision_feature_layer", -1)
        # transformers ties the LM head by the top-level flag (InternVLConfig's default: True)
        fields["text_overrides"] = {"tie_word_embeddings": hf.get("tie_word_embeddings", True)}
        return fields

    def processor_fields(self, preprocessor: dict[str, Any]) -> dict[str, Any]:
        """GotOcr2ImageProcessor's `max_patches` is the most tiles (`crop_to_patches` false: one tile), and its mean
        and std normalise; its `min_patches` must be 1 (every released InternVL's), as our tiling assumes."""
        if preprocessor.get("min_patches", 1) != 1:
            raise ConfigError(f"preprocessor_config.json has min_patches={preprocessor['min_patches']}: only 1 (every released "
                              "InternVL's) is supported")
        fields = normalisation(preprocessor)
        if preprocessor.get("crop_to_patches", True) is False:
            fields["max_tiles"] = 1
        elif "max_patches" in preprocessor:
            fields["max_tiles"] = int(preprocessor["max_patches"])
        return fields

    # --- modules and weights --------------------------------------------------------------------
    def build(self, model) -> None:
        model.vision_tower = hf_from_config(model.config.hf_vision_config())
        model.multi_modal_projector = InternVLMultiModalProjector(self.hf_config(model.config))

    def to_hub_name(self, key: str) -> str:
        return rename(key, SAVE_PREFIXES)

    def to_internal_name(self, key: str) -> str:
        if key.startswith("model."):
            key = key[len("model.") :]
        return rename(key, LOAD_PREFIXES)

    def dropped_on_load(self, key: str) -> bool:
        return False

    # --- the layout -----------------------------------------------------------------------------
    def tiles_per_image(self, config: MLLMConfig, size) -> int:
        """Tiles of an image of `size` (height, width), the thumbnail included (transformers' count);
        a one-element `size` is the tile count itself (`sizes_from_prompt`)."""
        if len(size) == 1:
            return int(size[0])
        tile = config.tile_size
        cols, rows = get_optimal_tiled_canvas(tuple(int(v) for v in size), (tile, tile), 1, max_tiles(config))
        return cols * rows + int(cols * rows > 1)

    def tokens_per_image(self, config: MLLMConfig, size: tuple[int, int] | None = None) -> int:
        if size is None:
            raise ValueError("internvl gives each image 256 tokens per tile, and its tiles depend on its size: pass its (height, width)")
        return self.tiles_per_image(config, size) * (config.grid_size // 2) ** 2

    def image_places(self, config: MLLMConfig, size: tuple[int, int] | None = None, device=None) -> Tensor:
        if size is None:
            raise ValueError("internvl tiles each image by its size: pass its (height, width)")
        side = config.grid_size // 2
        return torch.cat([grid_place(side, side, unit=u, first_patch=u * side * side, device=device)
                          for u in range(self.tiles_per_image(config, size))])

    def sizes_from_prompt(self, config: MLLMConfig, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor) -> Tensor:
        """Each image's tile count [n_images, 1] from its run of placeholders (tiles * (g/2)^2), checked
        against the tiles of `pixel_values`: what transformers' forward, which takes no sizes, implies."""
        runs = placeholder_runs(input_ids, attention_mask, config.image_token_id)
        per_tile, most = (config.grid_size // 2) ** 2, max_tiles(config)
        tiles = (runs // per_tile).tolist()
        possible = {1, *range(3, most + 2)}  # one tile, or 2..max_tiles tiles and the thumbnail
        if bool((runs % per_tile).any()) or not set(tiles) <= possible:
            raise ValueError(
                f"internvl without image_sizes reads each image's tiles from its placeholders, but the runs of image tokens "
                f"hold {runs.tolist()}: each image needs tiles x {per_tile} consecutive placeholders with 1 or 3..{most + 1} "
                "tiles (one run per image, as InternVLProcessor writes it between <img> and </img>); pass image_sizes "
                "[n_images, 2] otherwise")
        given = pixel_values.shape[0] if pixel_values.dim() == 4 else None
        if given is not None and given != sum(tiles):
            raise ValueError(f"internvl without image_sizes: the placeholders ask for {tiles} tiles ({sum(tiles)} in all), but "
                             f"pixel_values hold {given}; give every image's tiles, or image_sizes")
        return torch.tensor(tiles, device=runs.device)[:, None]

    # --- visual tokens --------------------------------------------------------------------------
    def image_count(self, pixel_values, image_sizes) -> int:
        return 0 if pixel_values is None else len(image_sizes)

    def hf_image_inputs(self, config, input_ids, attention_mask, pixel_values, image_sizes):
        """Every real tile, flat (transformers' InternVL takes no sizes)."""
        n_tiles = [self.tiles_per_image(config, s) for s in image_sizes.tolist()]
        return {"pixel_values": real_tiles(pixel_values, n_tiles, image_sizes.tolist())}

    def image_pixels(self, config, pixel_values, image_sizes):
        return tiles_by_image(self, config, pixel_values, image_sizes)

    def encode(self, model, pixel_values: Tensor, image_sizes: Tensor | None, scores: str | None = None,
               sizes: list[tuple[int, ...]] | None = None) -> VisualTokens:
        config = model.config
        if image_sizes is None:
            raise ValueError("internvl needs image_sizes [n_images, 2] (height, width) beside pixel_values: they decide "
                             "how many of the tiles belong to each image")
        sizes = sizes or [tuple(int(v) for v in s) for s in image_sizes.tolist()]
        n_tiles = [self.tiles_per_image(config, s) for s in sizes]
        tiles = real_tiles(pixel_values, n_tiles, sizes)
        with model.tower_grad():
            features, score = tower_features(model.vision_tower, tiles, config, scores)  # CLS dropped: [N, g*g, d]
        n, _, d = features.shape
        g = config.grid_size
        h = model.multi_modal_projector(pixel_shuffle(features.reshape(n, g, g, d)).reshape(n, -1, 4 * d))
        place = torch.cat([self.image_places(config, s, h.device) for s in sizes])
        unit_scores = None
        if score is not None:
            units = pixel_shuffle(score.reshape(n, g, g, 1)).reshape(n, -1, 4)
            unit_scores = {scores: (units.sum(-1) if scores == "dominance" else units.mean(-1)).reshape(-1)}
        counts = on_device([t * (g // 2) ** 2 for t in n_tiles], h.device)
        return VisualTokens(h.reshape(-1, h.shape[-1]), place, counts, None, unit_scores)

    def vision_flops(self, config: MLLMConfig, size: tuple[int, int]) -> dict[str, int]:
        """Every tile (the thumbnail included) through the whole tower (CLS among its tokens) and the
        projector on its (g/2)^2 pixel-shuffled tokens of 4x the tower's width."""
        tiles = self.tiles_per_image(config, size)
        d_vision, d_text = config.hf_vision_config().hidden_size, config.hf_text_config().hidden_size
        return {"tower": tiles * tower_flops(config),
                "projector": tiles * mlp_flops((config.grid_size // 2) ** 2, [4 * d_vision, d_text, d_text])}

    # --- preprocessing --------------------------------------------------------------------------
    def image_processor(self, config: MLLMConfig) -> ImageProcessor:
        return InternVLTiles(config)

    # --- training and parallelism ---------------------------------------------------------------
    def vision_layers(self, model) -> list[nn.Module]:
        return list(encoder_layers(model.vision_tower))

    def unused_vision_modules(self, model) -> list[nn.Module]:
        layers = encoder_layers(model.vision_tower)
        used = model.config.vision_layers_used
        return [*layers[used:], *([model.vision_tower.layernorm] if used < len(layers) else [])]
