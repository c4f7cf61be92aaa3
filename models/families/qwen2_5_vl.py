"""Qwen2.5-VL (arXiv 2502.13923): Qwen2-VL's resizing, M-RoPE and placeholders, with a tower of
RMSNorm / SwiGLU blocks that attend within windows of `window_size` pixels (4 x 4 merge units in
the released models) except the `fullatt_block_indexes` blocks, which attend over each image.

The tower holds its merge units in window order (transformers' `get_vision_window_index`); the
merger's output and any tower score are put back into raster order (`argsort` of that order), so
the LLM sees the same layout as Qwen2-VL. The merger writes `out_hidden_size`-wide tokens (the
vision `hidden_size` is the tower's width). Checkpoints are `Qwen2_5_VLForConditionalGeneration`'s.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.vision_utils import get_vision_window_index

from ..family import register
from .qwen2_vl import Qwen2VLFamily


@register
class Qwen25VLFamily(Qwen2VLFamily):
    name = "qwen2_5_vl"
    hf_model_type = "qwen2_5_vl"
    hf_architecture = "Qwen2_5_VLForConditionalGeneration"
    vision_types = {"qwen2_5_vl_vision": "qwen2_5_vl"}
    text_types = {"qwen2_5_vl_text": "qwen2_5_vl"}
    hf_processor_class = "Qwen2_5_VLProcessor"
    hf_config_class = Qwen2_5_VLConfig
    tower_class = Qwen2_5_VisionTransformerPretrainedModel
    merged_width_key = "out_hidden_size"

    def step_times(self, config, steps: int, seconds: Tensor | None) -> Tensor:
        """Time offsets of a video's steps: each step spans `seconds` (`second_per_grid_ts`: 2 frames /
        the sampled fps), M-RoPE's t counts `tokens_per_second` per second, floored per step. In the
        arithmetic of each rule's reference: `hf` k * (tps * s) (transformers' `get_rope_index`),
        `qwen` k * s * tps (Qwen's original rule) in float32."""
        if steps == 1:
            return torch.zeros(1, dtype=torch.long)
        if seconds is None or not float(seconds) > 0:
            raise ValueError(f"{self.name} places a video's {steps} temporal steps in time by the seconds each spans: give "
                             f"second_per_grid_ts (2 / the sampled fps) > 0 for every video, got {seconds}")
        tps = config.hf_vision_config().tokens_per_second
        seconds = torch.as_tensor(seconds, dtype=torch.float32)
        if config.mrope_rule == "hf":
            return (torch.arange(steps) * (tps * seconds)).long()
        return (torch.arange(steps) * seconds.item() * tps).long()

    def visual_items(self, config, input_ids, attention_mask, pixel_values, image_sizes, videos):
        if videos is not None and videos[2] is None:
            raise ValueError(f"{self.name} places video tokens in time by second_per_grid_ts (2 / the sampled fps of each "
                             "video): pass it (transformers' processor falls back to 24 fps without metadata, 0.083 s)")
        return super().visual_items(config, input_ids, attention_mask, pixel_values, image_sizes, videos)

    def tower_width(self, vision) -> int:
        return vision.hidden_size

    def mlp_flops(self, vision, n: int) -> int:
        """SwiGLU: gate, up and down projections, `intermediate_size` wide."""
        return 6 * n * vision.hidden_size * vision.intermediate_size

    def attention_segments(self, config, h: int, w: int) -> list[list[int]]:
        """Windows of `window_size` pixels (transformers' own tiling) in every block except the
        `fullatt_block_indexes` ones, which attend over the whole image."""
        v = config.hf_vision_config()
        grid = torch.tensor([[1, h, w]])
        _, bounds = get_vision_window_index(grid, spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
                                            patch_size=v.patch_size)
        windows = (bounds[1:] - bounds[:-1]).tolist()
        return [[h * w] if i in v.fullatt_block_indexes else windows for i in range(v.depth)]

    def _windows(self, tower, grids: Tensor) -> tuple[Tensor, Tensor]:
        return get_vision_window_index(grids, spatial_merge_size=tower.spatial_merge_size, window_size=tower.window_size,
                                       patch_size=tower.patch_size)

    def unit_order(self, tower, grids: Tensor, units: int | None = None) -> Tensor:
        return self._windows(tower, grids)[0].to(grids.device)

    def window_seqlens(self, tower, grids: Tensor) -> Tensor:
        return self._windows(tower, grids)[1]

    def block_seqlens(self, tower, block: int, full: Tensor, windows: Tensor | None) -> Tensor:
        return full if block in tower.fullatt_block_indexes else windows
