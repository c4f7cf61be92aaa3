"""Qwen3-VL (dense and MoE): Qwen2-VL's dynamic resolution and placeholders with a new tower, a
Qwen3 (or Qwen3-MoE) LLM with per-head q/k norms, interleaved M-RoPE, and DeepStack.

* The tower (`Qwen3VLVisionModel`): Conv3d patches of 16 px, a learned square position table
  bilinearly interpolated to each image's patch grid and added to the patches, 2-D rotary positions,
  full attention per image in every block (no windows), run block by block here. Patches arrive
  2 x 2-merge-block-major, as in Qwen2-VL, so the merge units are in raster order and one LLM token
  covers 32 x 32 pixels. Its `merger` is our projector.
* DeepStack: each tower block listed in `deepstack_visual_indexes` has its own merger
  (`deepstack_merger_list[i]`, LayerNorm after the 2 x 2 concatenation); transformers adds merger i's
  output to the visual tokens after decoder layer i. Here the family hands these features to the LLM
  as each token's `inject` (`models.family.VisualTokens`), so they travel with their tokens through
  every plan (`models.streams.injected` says what each plan does with them: a token pruned or withdrawn
  before an injection layer takes its injections with it, a frozen token still receives them, ViCA's
  bypass stream receives them in its own stream). The mergers live beside the projector
  (`model.deepstack_mergers`, on disk `model.visual.deepstack_merger_list.*`) and train with it.
* Positions: transformers' `get_rope_index` for images is Qwen2-VL's rule (`mrope_row`); the
  interleaving of (t, h, w) frequencies (H at indices 1, 4, 7, ..., W at 2, 5, 8, ...) happens inside
  the LLM's own rotary module, which our model calls for every token's (t, h, w) triple.

Checkpoints are `Qwen3VLForConditionalGeneration`'s / `Qwen3VLMoeForConditionalGeneration`'s
(`model.visual.*`, `model.language_model.*`, `lm_head.*`); images are preprocessed by
`Qwen2VLImageProcessorPil` with the released preprocessor_config.json's bounds (65,536 to
16,777,216 pixels) and 0.5 / 0.5 normalisation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import Qwen3VLConfig, Qwen3VLMoeConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel
from transformers.vision_utils import get_vision_interpolation_indices_and_weights

from ..config import MLLMConfig
from ..family import register
from ..gathered import hf_from_config
from ..validation import ConfigError
from .llava import rename
from .qwen2_vl import Qwen2VLFamily

# The released checkpoints' preprocessor_config.json: {"size": {"shortest_edge": 65536, "longest_edge": 16777216}}
MIN_PIXELS, MAX_PIXELS = 65536, 16777216

LOAD_PREFIXES = [  # on disk (transformers' save_pretrained) -> ours
    ("model.visual.merger.", "multi_modal_projector."),
    ("model.visual.deepstack_merger_list.", "deepstack_mergers."),
    ("model.visual.", "vision_tower."),
    ("model.language_model.", "language_model."),
]
SAVE_PREFIXES = [
    ("multi_modal_projector.", "model.visual.merger."),
    ("deepstack_mergers.", "model.visual.deepstack_merger_list."),
    ("vision_tower.", "model.visual."),
    ("language_model.", "model.language_model."),
]


def deepstack_blocks(vision_config) -> tuple[int, ...]:
    """The tower blocks DeepStack reads (Qwen3-VL); none for a tower without DeepStack (Qwen3.5's)."""
    return tuple(getattr(vision_config, "deepstack_visual_indexes", None) or ())


@register
class Qwen3VLFamily(Qwen2VLFamily):
    name = "qwen3_vl"
    hf_model_type = "qwen3_vl"
    hf_architecture = "Qwen3VLForConditionalGeneration"
    vision_types = {"qwen3_vl_vision": "qwen3_vl"}
    text_types = {"qwen3_vl_text": "qwen3"}
    hf_processor_class = "Qwen3VLProcessor"
    hf_config_class = Qwen3VLConfig
    tower_class = Qwen3VLVisionModel
    default_pixels = (MIN_PIXELS, MAX_PIXELS)
    frame_timestamps = True  # a video's steps are written apart, each after its "<1.5 seconds>" (Qwen3VLProcessor)
    merged_width_key = "out_hidden_size"
    llm_type = "qwen3"

    # --- configuration ------------------------------------------------------------------------
    def validate(self, config: MLLMConfig) -> None:
        super().validate(config)
        vision, text = config.hf_vision_config(), config.hf_text_config()
        side = int(vision.num_position_embeddings**0.5)
        if side * side != vision.num_position_embeddings:
            raise ConfigError(f"model.vision.num_position_embeddings={vision.num_position_embeddings} must be a square number "
                              "(the learned position table is a square grid, 2304 = 48 x 48 in the released models)")
        blocks = deepstack_blocks(vision)
        bad = [i for i in blocks if not 0 <= i < vision.depth]
        if bad:
            raise ConfigError(f"model.vision.deepstack_visual_indexes {bad} are not tower blocks (depth {vision.depth})")
        if len(blocks) > text.num_hidden_layers:
            raise ConfigError(f"{len(blocks)} DeepStack features are added after as many decoder layers, "
                              f"but the LLM has {text.num_hidden_layers}")

    # --- modules and weights --------------------------------------------------------------------
    def build(self, model) -> None:
        tower = hf_from_config(model.config.hf_vision_config(), self.tower_class)
        model.multi_modal_projector = tower.merger
        del tower.merger
        if deepstack_blocks(tower.config):
            model.deepstack_mergers = tower.deepstack_merger_list  # one per DeepStack block, trained with the projector
            del tower.deepstack_merger_list
        model.vision_tower = tower

    def to_internal_name(self, key: str) -> str:
        return rename(key, LOAD_PREFIXES)

    def to_hub_name(self, key: str) -> str:
        return rename(key, SAVE_PREFIXES)

    def projector_extras(self, model) -> list[nn.Parameter]:
        return list(model.deepstack_mergers.parameters()) if hasattr(model, "deepstack_mergers") else []

    # --- the tower ------------------------------------------------------------------------------
    def embed_patches(self, tower, pixel_values: Tensor, grids: Tensor) -> Tensor:
        """The patch embedding plus the learned position table interpolated to each image's grid
        (transformers' own indices and weights, in merge-block order)."""
        index, weight = get_vision_interpolation_indices_and_weights(
            grids, num_grid_per_side=tower.num_grid_per_side, mode=tower.interpolation_mode,
            align_corners=tower.interpolation_align_corners, spatial_merge_size=tower.spatial_merge_size)
        x = tower.patch_embed(pixel_values)
        return x + (tower.pos_embed(index) * weight[:, :, None]).sum(1).to(x.dtype)

    def captured_blocks(self, tower) -> tuple[int, ...]:
        return deepstack_blocks(tower.config)

    def injections(self, model, captured: dict[int, Tensor]) -> Tensor | None:
        """DeepStack: merger i of the output of block `deepstack_visual_indexes[i]`, for decoder layer i."""
        blocks = deepstack_blocks(model.vision_tower.config)
        if not blocks:
            return None
        return torch.stack([merger(captured[b]) for merger, b in zip(model.deepstack_mergers, blocks)], dim=1)

    # --- positions ------------------------------------------------------------------------------
    def rope_positions(self, config: MLLMConfig, attention_mask: Tensor, is_image: Tensor, image_sizes: Tensor | None,
                       step_seconds: Tensor | None = None) -> Tensor:
        """A video's time lives in the text (a timestamp before each step), so each of its temporal steps
        is placed like an image of its own, as transformers' `get_rope_index` splits the video grids
        (`mrope_row`; with one step per span the two M-RoPE rules agree)."""
        if image_sizes is not None and bool((image_sizes[:, 0] > 1).any()):
            image_sizes = image_sizes.repeat_interleave(image_sizes[:, 0], dim=0)
            image_sizes[:, 0] = 1
        return super().rope_positions(config, attention_mask, is_image, image_sizes)

    # --- cost -----------------------------------------------------------------------------------
    def tower_width(self, vision) -> int:
        return vision.hidden_size

    def mlp_flops(self, vision, n: int) -> int:
        """A block's MLP on `n` patches: two matrices, `intermediate_size` wide."""
        return 4 * n * vision.hidden_size * vision.intermediate_size

    def vision_flops(self, config: MLLMConfig, size: tuple[int, ...]) -> dict[str, int]:
        """Qwen2-VL's count (patch embedding, blocks, merger; the interpolated position table is a
        weighted lookup, no matmul) plus the DeepStack mergers, each the merger's two linear layers."""
        out = super().vision_flops(config, size)
        blocks = deepstack_blocks(config.hf_vision_config())
        if blocks:
            out["deepstack"] = len(blocks) * out["projector"]
        return out


@register
class Qwen3VLMoeFamily(Qwen3VLFamily):
    name = "qwen3_vl_moe"
    hf_model_type = "qwen3_vl_moe"
    hf_architecture = "Qwen3VLMoeForConditionalGeneration"
    vision_types = {"qwen3_vl_moe_vision": "qwen3_vl"}
    text_types = {"qwen3_vl_moe_text": "qwen3_moe"}
    llm_type = "qwen3_moe"
    hf_config_class = Qwen3VLMoeConfig
    tower_class = Qwen3VLMoeVisionModel
