"""LLaVA-NeXT (LLaVA-1.6, "anyres"): LLaVA-1.5's tower, projector and LLM over tiles of a high-
resolution image.

An image of size (H, W) is resized and centre-padded to the best canvas of `image_grid_pinpoints`
(transformers' `select_best_resolution`) and cut into tower-sized tiles; a resize of the whole
image ("base") comes first. Every tile goes through the tower and the projector. The base tile's
g x g tokens come first; the other tiles are laid out as one global grid (tile rows interleaved),
the padding rows or columns are removed to the original aspect ratio (`unpad_image`), and the
learned `image_newline` ends every row. At 672 x 672 with a 336 px tower that is 576 + 48 x 49 =
2928 tokens. Each token's place: unit 0 for the base, 1 + (tile row x tiles per row + tile column)
for the tiles, its row and column on that tile's grid (before unpadding); newlines are layout
tokens (`Place.EXTRA`): selections and pooling keep them, FLOPs count them as visual.

Checkpoints: `LlavaNextForConditionalGeneration`'s config.json and LLaVA's weight names plus
`image_newline`; the transformers functions that decide the layout (`select_best_resolution`,
`get_anyres_image_grid_shape`, `image_size_to_num_patches`, `unpad_image`) are called here, not
re-derived, and preprocessing is transformers' `LlavaNextImageProcessorPil`.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import LlavaNextConfig
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from ..config import MLLMConfig
from ..family import register
from ..validation import ConfigError
from ..family import ImageProcessor, ProcessedImage, VisualTokens, grid_place, on_device, real_tiles, tiles_by_image
from ..gathered import gathered
from ..streams import Place
from ..vision import tower_features
from ..vision_flops import mlp_flops, tower_flops
from .llava import LlavaFamily


class AnyresTiles(ImageProcessor):
    """transformers' `LlavaNextImageProcessorPil` for one config: [tiles, 3, S, S] per image (the
    base resize first), S the tower's image size."""

    def __init__(self, config: MLLMConfig):
        size = config.hf_vision_config().image_size
        self.processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size},
            image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
            image_mean=list(config.image_mean), image_std=list(config.image_std), do_pad=False,
        )

    def __call__(self, image: Image.Image) -> ProcessedImage:
        out = self.processor(images=[image.convert("RGB")], return_tensors="pt")
        return ProcessedImage(out["pixel_values"][0], (image.height, image.width))


def span(indices: tuple[int, ...], device) -> Tensor:
    """The kept rows (or columns) of an unpadded grid, a consecutive band, made on `device` by `arange`."""
    if list(indices) != list(range(indices[0], indices[0] + len(indices))):
        raise ValueError(f"unpadding kept rows or columns {indices}, not one band")
    return torch.arange(indices[0], indices[0] + len(indices), device=device)


@lru_cache(maxsize=4096)
def _unpadded_grid(size: tuple[int, int], pinpoints: tuple[tuple[int, int], ...], tile: int, grid: int) -> tuple:
    """(tiles per column, tiles per row, kept global rows, kept global columns) of an image of
    `size`: what `pack_image_features` keeps of the global grid, found by unpadding a grid of
    coordinates with transformers' own `unpad_image`."""
    n_h, n_w = get_anyres_image_grid_shape(list(size), [list(p) for p in pinpoints], tile)
    coords = torch.stack(torch.meshgrid(torch.arange(n_h * grid), torch.arange(n_w * grid), indexing="ij"))
    kept = unpad_image(coords, list(size))
    return n_h, n_w, tuple(kept[0][:, 0].tolist()), tuple(kept[1][0].tolist())


@register
class LlavaNextFamily(LlavaFamily):
    name = "llava_next"
    hf_model_type = "llava_next"
    hf_architecture = "LlavaNextForConditionalGeneration"
    variable_tokens = True
    hf_processor_class = "LlavaNextProcessor"

    # --- configuration ------------------------------------------------------------------------
    def validate_grid(self, config: MLLMConfig) -> None:
        pinpoints = config.image_grid_pinpoints
        tile = config.hf_vision_config().image_size
        if not pinpoints:
            raise ConfigError("model.family=llava_next needs model.image_grid_pinpoints, the canvases images are tiled to "
                              f"(e.g. [[{tile},{2 * tile}],[{2 * tile},{tile}],[{2 * tile},{2 * tile}]])")
        for p in pinpoints:
            if len(p) != 2 or any(not isinstance(v, int) or v < tile or v % tile for v in p):
                raise ConfigError(f"model.image_grid_pinpoints entry {p} must be [height, width], multiples of the tower's "
                                  f"image_size {tile}")
        if config.vision_feature_select_strategy != "default" and config.has_cls:
            raise ConfigError("model.family=llava_next tiles CLIP without its CLS token: set vision_feature_select_strategy=default")

    def hf_config(self, config: MLLMConfig):
        return LlavaNextConfig(**self.hf_config_fields(config), image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
                               image_seq_length=config.grid_size**2, multimodal_projector_bias=True)

    def config_fields(self, hf: dict[str, Any]) -> dict[str, Any]:
        fields = super().config_fields(hf)
        fields["image_grid_pinpoints"] = [list(p) for p in hf.get("image_grid_pinpoints") or LlavaNextConfig().image_grid_pinpoints]
        return fields

    # --- modules and weights --------------------------------------------------------------------
    def build(self, model) -> None:
        super().build(model)
        model.image_newline = nn.Parameter(torch.zeros(model.text_config.hidden_size))

    def init_weights(self, model) -> None:
        super().init_weights(model)
        with gathered([model.image_newline]), torch.no_grad():  # transformers' init: N(0, 1 / sqrt(d))
            nn.init.normal_(model.image_newline, std=1 / math.sqrt(model.text_config.hidden_size))

    def projector_extras(self, model) -> list[nn.Parameter]:
        return [model.image_newline]

    # --- the layout -----------------------------------------------------------------------------
    def _grid(self, config: MLLMConfig, size) -> tuple:
        tile = config.hf_vision_config().image_size
        return _unpadded_grid(tuple(int(v) for v in size), tuple(tuple(p) for p in config.image_grid_pinpoints), tile, config.grid_size)

    def tiles_per_image(self, config: MLLMConfig, size) -> int:
        """Tiles of an image of `size` (height, width), the base included (transformers' count)."""
        tile = config.hf_vision_config().image_size
        return image_size_to_num_patches([int(v) for v in size], [list(p) for p in config.image_grid_pinpoints], tile)

    def tokens_per_image(self, config: MLLMConfig, size: tuple[int, int] | None = None) -> int:
        if size is None:
            raise ValueError("llava_next gives each image as many tokens as its size needs: pass its (height, width)")
        _, _, rows, cols = self._grid(config, size)
        return config.grid_size**2 + len(rows) * (len(cols) + 1)

    def places(self, config: MLLMConfig, size, device=None) -> tuple[Tensor, Tensor]:
        """Places [n, len(Place)] of one image's tokens in sequence order, and for each token the
        (tile, index on the tile) it comes from [n, 2] (-1 for newlines)."""
        g = config.grid_size
        n_h, n_w, rows, cols = self._grid(config, size)
        base = grid_place(g, g, device=device)
        rows_t, cols_t = span(rows, device), span(cols, device)
        width = len(cols) + 1  # each kept row, then its newline
        r = rows_t[:, None].expand(-1, width).reshape(-1)
        c = torch.cat([cols_t, torch.full((1,), -1, device=device)])[None].expand(len(rows), -1).reshape(-1)
        newline = c < 0
        place = torch.zeros(len(r), len(Place), dtype=torch.long, device=device)
        place[:, Place.PATCH] = g * g + torch.arange(len(r), device=device)
        place[:, Place.UNIT] = torch.where(newline, 0, 1 + (r // g) * n_w + c.clamp(min=0) // g)
        place[:, Place.ROW] = torch.where(newline, -1, r % g)
        place[:, Place.COL] = torch.where(newline, -1, c % g)
        place[:, Place.EXTRA] = newline.long()
        source = torch.stack([torch.where(newline, -1, place[:, Place.UNIT]),
                              torch.where(newline, -1, place[:, Place.ROW] * g + place[:, Place.COL])], 1)
        base_source = torch.stack([torch.zeros(g * g, dtype=torch.long, device=device), torch.arange(g * g, device=device)], 1)
        return torch.cat([base, place]), torch.cat([base_source, source])

    def image_places(self, config: MLLMConfig, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            raise ValueError("llava_next lays out each image by its size: pass its (height, width)")
        return self.places(config, size)[0]

    # --- visual tokens --------------------------------------------------------------------------
    def image_count(self, pixel_values, image_sizes) -> int:
        return 0 if pixel_values is None else len(image_sizes)

    def hf_image_inputs(self, config, input_ids, attention_mask, pixel_values, image_sizes):
        return {"pixel_values": pixel_values, "image_sizes": image_sizes}

    def image_pixels(self, config, pixel_values, image_sizes):
        return tiles_by_image(self, config, pixel_values, image_sizes)

    def encode(self, model, pixel_values: Tensor, image_sizes: Tensor | None, scores: str | None = None,
               sizes: list[tuple[int, ...]] | None = None) -> VisualTokens:
        """`pixel_values` [n_images, max_tiles, 3, S, S] (transformers' padded layout) or the real
        tiles of every image concatenated [sum tiles, 3, S, S]; `image_sizes` [n_images, 2] (H, W)."""
        config = model.config
        if image_sizes is None:
            raise ValueError("llava_next needs image_sizes [n_images, 2] (height, width) beside pixel_values")
        sizes = sizes or [tuple(int(v) for v in s) for s in image_sizes.tolist()]
        n_tiles = [self.tiles_per_image(config, s) for s in sizes]
        tiles = real_tiles(pixel_values, n_tiles, sizes)
        with model.tower_grad():
            features, score = tower_features(model.vision_tower, tiles, config, scores)
        projected = model.multi_modal_projector(features)  # [sum tiles, g*g, d]
        h, places, extra_scores, counts = [], [], [], []
        start = 0
        for size, n in zip(sizes, n_tiles):
            place, source = self.places(config, size, projected.device)
            own = projected[start : start + n]
            newline = source[:, 0] < 0
            index = source.clamp(min=0)
            tokens = own[index[:, 0], index[:, 1]]
            tokens = torch.where(newline[:, None], model.image_newline.to(tokens.dtype), tokens)
            h.append(tokens)
            places.append(place)
            counts.append(len(place))
            if score is not None:
                s = score[start : start + n][index[:, 0], index[:, 1]]
                extra_scores.append(s.masked_fill(newline, math.inf if scores == "dominance" else 0.0))
            start += n
        return VisualTokens(
            torch.cat(h), torch.cat(places), on_device(counts, projected.device), None,
            {scores: torch.cat(extra_scores)} if score is not None else None,
        )

    def vision_flops(self, config: MLLMConfig, size: tuple[int, int]) -> dict[str, int]:
        """Every tile (the base included) through the tower and the projector; newlines cost nothing."""
        tiles = self.tiles_per_image(config, size)
        return {"tower": tiles * tower_flops(config),
                "projector": tiles * mlp_flops(config.grid_size**2, self.projector_widths(config))}

    # --- preprocessing --------------------------------------------------------------------------
    def image_processor(self, config: MLLMConfig) -> ImageProcessor:
        return AnyresTiles(config)
