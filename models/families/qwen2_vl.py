"""Qwen2-VL (arXiv 2409.12191): dynamic resolution, a ViT with 2-D rotary positions and full
attention per image, a 2 x 2 `PatchMerger` as the projector, and M-RoPE in the LLM.

An image is resized so that both sides are multiples of 28 (patch 14 x merge 2) and its pixel
count lies within `min_pixels` / `max_pixels` (transformers' `smart_resize`); its grid of
(t, h, w) patches (t = 1 for a still image) goes through the tower, and every 2 x 2 block of
patches becomes one LLM token: an image is one unit of (h/2) x (w/2) tokens, row-major, so
grids vary per image. The placeholders are `<|vision_start|>` + that many `<|image_pad|>` +
`<|vision_end|>`; the data path writes them (transformers' `Qwen2VLProcessor` needs torchvision).

Positions are M-RoPE's (t, h, w) triples (`mrope_row`, one row at a time): a text token has its
running index in all three, an image token the running index plus its (0, row, column), and an
image advances the running index by max(h, w) / 2 only. So positions are not ranks: selections
keep each kept token's triple (`renumbers_positions = False` refuses PyramidDrop's renumbering),
and decoding continues one past the prompt's largest position (models/mllm.py `next_positions`).

The tower is transformers' own module (`Qwen2VisionTransformerPretrainedModel`) run block by block
here, with its merger attached as our `multi_modal_projector`; checkpoints are
`Qwen2VLForConditionalGeneration`'s (`visual.*`, `model.*`, `lm_head.*` on disk). Tower scores for
`dominant` are recomputed from the last block's q/k (the block never returns its attention): the
attention each patch receives within its image, averaged over heads and queries, then over each
2 x 2 merge unit.
"""

from __future__ import annotations

from itertools import accumulate
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from transformers import Qwen2VLConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel, apply_rotary_pos_emb_vision

from ..config import MLLMConfig
from ..family import (Family, ImageProcessor, ProcessedImage, ProcessedVideo, VideoProcessor, VisualTokens, grid_place,
                      normalisation, on_device, register)
from ..gathered import hf_from_config
from ..validation import ConfigError
from ..video import VisualItems, merge_in_prompt_order
from .llava import rename

# The HF processors' defaults: 4 to 1280 LLM tokens per image, 128 to 768 per video frame.
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 1280
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 28 * 28, 768 * 28 * 28
MAX_VIDEO_TOKENS = 128000  # the reference's context budget for a video's pixels (VIDEO_TOTAL_PIXELS / 28^2 / 0.9)
SPECIAL_TOKENS = ("vision_start_token_id", "vision_end_token_id", "video_token_id")

LOAD_PREFIXES = [  # on disk (transformers' save_pretrained) and transformers-v5 in memory -> ours
    ("model.visual.merger.", "multi_modal_projector."),
    ("visual.merger.", "multi_modal_projector."),
    ("model.visual.", "vision_tower."),
    ("visual.", "vision_tower."),
    ("model.language_model.", "language_model."),
    ("model.", "language_model."),
]
SAVE_PREFIXES = [("multi_modal_projector.", "visual.merger."), ("vision_tower.", "visual."), ("language_model.", "model.")]


MROPE_RULES = ("qwen", "hf")  # how positions continue after a vision span (MLLMConfig.mrope_rule)


def mrope_row(is_image: Tensor, grids: Tensor, merge: int, rule: str = "hf", times: list[Tensor] | None = None) -> Tensor:
    """M-RoPE ids [3, n] of one row's `n` valid tokens: `is_image` [n] marks visual placeholders,
    `grids` [k, 3] the (t, h, w) patch grids of its images and videos in order (`merge` x `merge`
    patches per token, each temporal step's tokens row-major), `times` each item's time offsets [t]
    (None: 0, 1, ..., t - 1). A token of step k, row r, column c of an item starting at `start` sits
    at (start + times[k], start + r, start + c); text after it continues by `rule`: `hf` at start +
    max(rows, cols) (transformers >= 5.3's `get_rope_index`), `qwen` one past the item's largest
    position (Qwen's original rule, transformers <= 5.2: the two differ once a video's time offsets
    reach max(rows, cols)). One row at a time, so packed samples can restart it."""
    if rule not in MROPE_RULES:
        raise ValueError(f"mrope rule must be one of {MROPE_RULES}, got {rule!r}")
    n = len(is_image)
    out = torch.empty(3, n, dtype=torch.long, device=is_image.device)
    change = (torch.nonzero(is_image[1:] != is_image[:-1]).flatten() + 1).tolist()
    cur, item = 0, 0
    for start, end in zip([0, *change], [*change, n]):
        if not bool(is_image[start]):
            out[:, start:end] = torch.arange(cur, cur + end - start, device=out.device)
            cur += end - start
            continue
        while start < end:  # consecutive items without text between them
            if item >= len(grids):
                raise ValueError(f"a row holds more visual placeholders than its {len(grids)} image/video grid(s) give tokens")
            steps, h, w = (int(v) for v in grids[item])
            time = torch.arange(steps) if times is None else times[item]
            rows, cols = h // merge, w // merge
            count = steps * rows * cols
            if start + count > end:
                raise ValueError(f"an item of grid {(steps, h, w)} needs {count} consecutive placeholders, the row has {end - start}")
            index = torch.arange(count, device=out.device) % (rows * cols)
            out[0, start : start + count] = cur + time.to(out.device).repeat_interleave(rows * cols)
            out[1, start : start + count] = cur + index // cols
            out[2, start : start + count] = cur + index % cols
            cur += max(rows, cols) if rule == "hf" else max(int(time.max()), rows - 1, cols - 1) + 1
            start += count
            item += 1
    return out


def steps_of(size) -> int:
    """Temporal grid steps of an item given by its patch grid (t, h, w); 1 for an image's (height, width)."""
    return int(size[0]) if size is not None and len(size) == 3 else 1


class SmartResize(ImageProcessor):
    """transformers' `Qwen2VLImageProcessorPil` for one config: pixels [t*h*w, 3*2*14*14] (the tower's
    patch layout) and, as the image's size, its patch grid (t, h, w)."""

    def __init__(self, config: MLLMConfig):
        v = config.hf_vision_config()
        self.processor = Qwen2VLImageProcessorPil(
            min_pixels=config.min_pixels, max_pixels=config.max_pixels, patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size,
            image_mean=list(config.image_mean), image_std=list(config.image_std),
        )

    def __call__(self, image: Image.Image) -> ProcessedImage:
        out = self.processor(images=[image.convert("RGB")], return_tensors="pt")
        return ProcessedImage(out["pixel_values"], tuple(int(v) for v in out["image_grid_thw"][0]))


class FrameResize(VideoProcessor):
    """Qwen's video preprocessing without torchvision (transformers' `Qwen2VLVideoProcessor` needs it):
    every frame goes through transformers' PIL image processor (`smart_resize` within the video pixel
    bounds, capped as the reference does for long videos; bicubic; CLIP normalisation), and each
    temporal step stacks two frames' patches in the patch's temporal slot, the layout of
    transformers' video `patchify` (an odd last frame is repeated). `fps` is the sampled frames' rate,
    so a step spans 2 / fps seconds."""

    def __init__(self, config: MLLMConfig):
        self.config = config
        v = config.hf_vision_config()
        self.patch, self.temporal, self.merge = v.patch_size, v.temporal_patch_size, v.spatial_merge_size
        self.bounds = (config.video_min_pixels or config.min_pixels, config.video_max_pixels or config.max_pixels)

    def max_pixels(self, n_frames: int) -> int:
        """A frame's pixel bound: the video maximum, or an even share of MAX_VIDEO_TOKENS' pixels if less
        (the reference's total cap, `cap_pixels_per_frame`), never under 1.05 x the minimum."""
        factor = self.patch * self.merge
        total = int(MAX_VIDEO_TOKENS * factor * factor * 0.9)
        return max(min(self.bounds[1], total * self.temporal // n_frames), int(self.bounds[0] * 1.05))

    def grid(self, n_frames: int, size: tuple[int, int]) -> tuple[int, int, int]:
        """The patch grid (t, h, w) of `n_frames` frames of `size` (height, width)."""
        factor = self.patch * self.merge
        h, w = smart_resize(int(size[0]), int(size[1]), factor=factor, min_pixels=self.bounds[0], max_pixels=self.max_pixels(n_frames))
        return -(-n_frames // self.temporal), h // self.patch, w // self.patch

    def __call__(self, frames, fps: float, frame_times: list[float] | None = None) -> ProcessedVideo:
        """`frame_times`: each frame's time in the source video in seconds (frame index / source fps;
        default k / fps), which gives the steps' timestamps (transformers' Qwen3VLProcessor's rule)."""
        frames = [f if isinstance(f, Image.Image) else Image.fromarray(np.asarray(f)) for f in frames]
        if not frames or not fps > 0:
            raise ValueError(f"a video needs at least one frame and its sampled fps > 0, got {len(frames)} frame(s) at {fps}")
        processor = Qwen2VLImageProcessorPil(
            min_pixels=self.bounds[0], max_pixels=self.max_pixels(len(frames)), patch_size=self.patch,
            temporal_patch_size=self.temporal, merge_size=self.merge,
            image_mean=list(self.config.image_mean), image_std=list(self.config.image_std),
        )
        out = processor(images=[f.convert("RGB") for f in frames], return_tensors="pt")
        _, h, w = (int(v) for v in out["image_grid_thw"][0])
        p, t = self.patch, self.temporal
        rows = out["pixel_values"].view(len(frames), h * w, 3, t, p, p)[:, :, :, 0]  # an image fills both slots with itself
        if len(frames) % t:
            rows = torch.cat([rows, rows[-1:].expand(t - len(frames) % t, -1, -1, -1, -1)])
        steps = rows.shape[0] // t
        pixels = rows.view(steps, t, h * w, 3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(steps * h * w, 3 * t * p * p)
        times = list(frame_times) if frame_times is not None else [k / fps for k in range(len(frames))]
        times += times[-1:] * (steps * t - len(times))  # the repeated last frame
        stamps = tuple((times[k * t] + times[k * t + t - 1]) / 2 for k in range(steps))
        return ProcessedVideo(pixels.contiguous(), (steps, h, w), t / fps, stamps)


@register
class Qwen2VLFamily(Family):
    name = "qwen2_vl"
    hf_model_type = "qwen2_vl"
    hf_architecture = "Qwen2VLForConditionalGeneration"
    vision_types = {"qwen2_vl_vision": "qwen2_vl"}
    text_types = {"qwen2_vl_text": "qwen2_vl"}
    variable_tokens = True
    renumbers_positions = False  # M-RoPE triples are not ranks
    mrope = True
    image_wrap = ("<|vision_start|>", "<|vision_end|>")  # written around each image's placeholders
    video_token = "<|video_pad|>"
    hf_processor_class = "Qwen2VLProcessor"
    hf_config_class = Qwen2VLConfig
    tower_class = Qwen2VisionTransformerPretrainedModel
    default_pixels = (MIN_PIXELS, MAX_PIXELS)  # the processor's bounds when a checkpoint names none
    merged_width_key = "hidden_size"  # the vision config's field for the merger's output width
    llm_type = "qwen2"  # the LLM whose checkpoints hold this family's text model without M-RoPE (MLLM.from_components)

    # --- configuration ------------------------------------------------------------------------
    def merged_width(self, vision) -> int:
        """The merger's output width (must be the LLM's hidden size)."""
        return getattr(vision, self.merged_width_key)

    def adapt_backbones(self, config: MLLMConfig, vision, text):
        """An `llm_type` LLM is this family's text model (Qwen2-VL's LLM is Qwen2 with M-RoPE, Qwen3-VL's Qwen3:
        the same weights): its fields under the family's text type, with the preset's M-RoPE settings
        (`mrope_section`, Qwen3-VL's `mrope_interleaved`). The merger, a new projector here, writes the LLM's
        width. Other LLMs (Llama: no q/k/v biases, no q/k norms) are refused."""
        text_type = next(iter(self.text_types))
        if text is not None and text["model_type"] == self.llm_type:
            mrope = {k: v for k, v in (config.hf_text_config().rope_parameters or {}).items() if k.startswith("mrope")}
            text = {**text, "model_type": text_type, "rope_parameters": {**(text.get("rope_parameters") or {}), **mrope}}
        elif text is not None and text["model_type"] != text_type:
            raise ConfigError(f"the LLM checkpoint is a {text['model_type']} model; the {self.name} family's LLM is "
                              f"{self.llm_type}'s with M-RoPE (the same weights): give a {self.llm_type} LLM directory, or a "
                              f"family that takes {text['model_type']} LLMs (llava, llava_next, internvl)")
        if vision is not None:
            width = text["hidden_size"] if text is not None else config.hf_text_config().hidden_size
            vision = {**vision, self.merged_width_key: width}
        return super().adapt_backbones(config, vision, text)

    def validate(self, config: MLLMConfig) -> None:
        vision, text = config.hf_vision_config(), config.hf_text_config()
        if self.merged_width(vision) != text.hidden_size:
            raise ConfigError(f"the {self.name} merger writes {self.merged_width(vision)}-wide tokens but the LLM's hidden_size "
                              f"is {text.hidden_size}: set the vision config's merger width to the LLM's")
        section = (text.rope_parameters or {}).get("mrope_section")
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        rotary = int(head_dim * (text.rope_parameters or {}).get("partial_rotary_factor", 1.0))  # Qwen3.5 rotates a quarter
        if not section or sum(section) != rotary // 2:
            raise ConfigError(f"model.text.rope_parameters.mrope_section={section} must split the {rotary // 2} rotary "
                              "frequencies (rotary dims / 2) into (t, h, w) chunks, e.g. [16, 24, 24] for head_dim 128")
        for name in SPECIAL_TOKENS:
            if name not in config.token_ids or not 0 <= config.token_ids[name] < text.vocab_size:
                raise ConfigError(f"model.token_ids.{name} must be a token id inside the vocabulary ({text.vocab_size}), "
                                  f"got {config.token_ids.get(name)}")
        if config.min_pixels is None or config.max_pixels is None or not 0 < config.min_pixels <= config.max_pixels:
            raise ConfigError(f"model.min_pixels={config.min_pixels} / model.max_pixels={config.max_pixels}: set both, "
                              f"0 < min <= max (the processor's defaults are {self.default_pixels[0]} / {self.default_pixels[1]})")
        video = (config.video_min_pixels, config.video_max_pixels)
        if video != (None, None) and (None in video or not 0 < video[0] <= video[1]):
            raise ConfigError(f"model.video_min_pixels={video[0]} / model.video_max_pixels={video[1]}: set both, 0 < min <= max "
                              f"(the video processor's defaults are {VIDEO_MIN_PIXELS} / {VIDEO_MAX_PIXELS}), or neither (a "
                              "frame then gets an image's bounds)")
        if config.image_grid_pinpoints is not None:
            raise ConfigError(f"model.image_grid_pinpoints tiles images (llava_next); {self.name} resizes them: set it to null")

    def hf_config(self, config: MLLMConfig):
        return self.hf_config_class(
            vision_config=config.hf_vision_config().to_dict(), text_config=config.hf_text_config().to_dict(),
            image_token_id=config.image_token_id, tie_word_embeddings=config.ties_embeddings,
            **config.token_ids,
        )

    def current_hf_dict(self, hf: dict[str, Any]) -> dict[str, Any]:
        """The released checkpoints' config.json is flat (text fields at the top level, `rope_scaling`):
        transformers' config class reads that layout and writes the current one."""
        if "text_config" in hf:
            return hf
        return {**self.hf_config_class(**hf).to_dict(), "efficient_mllm": hf.get("efficient_mllm", {})}

    def config_fields(self, hf: dict[str, Any]) -> dict[str, Any]:
        return dict(
            image_token_id=hf["image_token_id"],
            token_ids={name: hf[name] for name in SPECIAL_TOKENS},
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            min_pixels=self.default_pixels[0],
            max_pixels=self.default_pixels[1],
            video_min_pixels=VIDEO_MIN_PIXELS,
            video_max_pixels=VIDEO_MAX_PIXELS,
        )

    def processor_fields(self, preprocessor: dict[str, Any]) -> dict[str, Any]:
        """The image processor's pixel bounds (`size` {shortest_edge, longest_edge} in transformers 5, or the older
        top-level `min_pixels` / `max_pixels`) and its mean and std."""
        size = preprocessor.get("size") or {}
        bounds = {"min_pixels": preprocessor.get("min_pixels", size.get("shortest_edge")),
                  "max_pixels": preprocessor.get("max_pixels", size.get("longest_edge"))}
        return normalisation(preprocessor) | {k: int(v) for k, v in bounds.items() if v is not None}

    # --- modules and weights --------------------------------------------------------------------
    def build(self, model) -> None:
        tower = hf_from_config(model.config.hf_vision_config(), self.tower_class)
        model.multi_modal_projector = tower.merger  # the 2 x 2 PatchMerger, trained as the projector
        del tower.merger
        model.vision_tower = tower

    def to_internal_name(self, key: str) -> str:
        return rename(key, LOAD_PREFIXES)

    def to_hub_name(self, key: str) -> str:
        return rename(key, SAVE_PREFIXES)

    # --- visual tokens --------------------------------------------------------------------------
    def grid(self, config: MLLMConfig, size: tuple[int, ...]) -> tuple[int, int]:
        """(rows, columns) of an image's LLM tokens; `size` is its patch grid (t, h, w) or its
        original (height, width), resized by `smart_resize`."""
        v = config.hf_vision_config()
        merge = v.spatial_merge_size
        if size is None:
            raise ValueError(f"{self.name} gives each image as many tokens as its size needs: pass its (height, width)")
        if len(size) == 3:
            _, h, w = size
            return h // merge, w // merge
        factor = v.patch_size * merge
        h, w = smart_resize(int(size[0]), int(size[1]), factor=factor, min_pixels=config.min_pixels, max_pixels=config.max_pixels)
        return h // factor, w // factor

    def visual_token_ids(self, config: MLLMConfig) -> tuple[int, int]:
        return config.image_token_id, config.token_ids["video_token_id"]

    def visual_items(self, config: MLLMConfig, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None,
                     image_sizes: Tensor | None, videos: tuple[Tensor, Tensor, Tensor | None]) -> VisualItems | None:
        images = None if pixel_values is None else (pixel_values, image_sizes)
        if images is not None and image_sizes is None:
            raise ValueError(f"{self.name} needs image_grid_thw [n_images, 3] (t, h, w patches) beside pixel_values")
        return merge_in_prompt_order(input_ids, attention_mask, self.visual_token_ids(config),
                                     config.hf_vision_config().spatial_merge_size, images, videos)

    def image_wrap_ids(self, config: MLLMConfig) -> tuple[int, int]:
        return config.token_ids["vision_start_token_id"], config.token_ids["vision_end_token_id"]

    def tokens_per_image(self, config: MLLMConfig, size=None) -> int:
        """Tokens of an image of original `size` (height, width), or of an item of patch grid (t, h, w):
        t * h * w / merge^2 (a video's steps one after another)."""
        rows, cols = self.grid(config, size)
        return steps_of(size) * rows * cols

    def image_places(self, config: MLLMConfig, size=None, device=None) -> Tensor:
        """Each step's raster grid in turn: a step is a unit of its own (UNIT and TIME are the step), PATCH
        the index in the item's span."""
        rows, cols = self.grid(config, size)
        return torch.cat([grid_place(rows, cols, unit=k, first_patch=k * rows * cols, time=k, device=device)
                          for k in range(steps_of(size))])

    def image_count(self, pixel_values, image_sizes) -> int:
        return 0 if pixel_values is None else len(image_sizes)

    def hf_image_inputs(self, config, input_ids, attention_mask, pixel_values, image_sizes):
        types = ((input_ids == config.image_token_id) & attention_mask.bool()).long()  # transformers' token types: 1 = image
        return {"pixel_values": pixel_values, "image_grid_thw": image_sizes, "mm_token_type_ids": types}

    def image_pixels(self, config, pixel_values, image_sizes):
        """[n_images, most patches, patch pixels]: each image's patches, zero padded."""
        if pixel_values is None or image_sizes is None:
            return pixel_values
        parts = pixel_values.split(image_sizes.prod(-1).tolist())
        return torch.nn.utils.rnn.pad_sequence(list(parts), batch_first=True)

    def encode(self, model, pixel_values: Tensor, image_sizes: Tensor | None, scores: str | None = None,
               sizes: list[tuple[int, ...]] | None = None) -> VisualTokens:
        """`pixel_values` [sum t*h*w, 3*2*14*14] (transformers' layout) and `image_sizes` = the
        images' `image_grid_thw` [n_images, 3]."""
        if image_sizes is None or image_sizes.dim() != 2 or image_sizes.shape[1] != 3:
            raise ValueError(f"{self.name} needs image_grid_thw [n_images, 3] (t, h, w patches) beside pixel_values")
        grids = image_sizes.to(pixel_values.device)
        sizes = sizes or [tuple(int(v) for v in g) for g in image_sizes.tolist()]
        patches = sum(t * h * w for t, h, w in sizes)
        if pixel_values.dim() != 2 or pixel_values.shape[0] != patches:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected [{patches}, patch pixels] for the image "
                             f"grids {sizes} (every image's patches, concatenated)")
        if scores not in (None, "dominance"):
            raise ValueError(f"{self.name}'s tower has no CLS token, so it gives no {scores!r} scores (only dominance)")
        with model.tower_grad():
            tower = self.run_tower(model.vision_tower, pixel_values, grids, scores == "dominance", sizes)
        merged = model.multi_modal_projector(tower.features)  # one token per 2 x 2 unit, in tower order (trains on its own)
        inject = self.injections(model, tower.captured)
        raster = torch.argsort(tower.unit_order)
        counts = on_device([self.tokens_per_image(model.config, g) for g in sizes], merged.device)
        places = torch.cat([self.image_places(model.config, g, merged.device) for g in sizes])
        score = None if tower.received is None else {scores: tower.received.view(-1, 4).mean(1)[raster]}
        return VisualTokens(merged[raster], places, counts, None, score, None if inject is None else inject[raster])

    def injections(self, model, captured: dict[int, Tensor]) -> Tensor | None:
        """Features [units, K, d] (tower order) added to the visual tokens after the first K decoder
        layers, from the tower blocks `captured_blocks` kept (Qwen3-VL's DeepStack); None: none."""
        return None

    def vision_flops(self, config: MLLMConfig, size: tuple[int, ...]) -> dict[str, int]:
        """Tower and projector FLOPs of one image (`size`: original (height, width), or its patch grid
        (t, h, w); a video of t steps costs t times one step). Counted are the matmuls and convolutions (what `FlopCounterMode` counts): the
        patch embedding, per block Q/K/V/O, attention scores and mixing over each attention segment
        (4 n^2 d, no halving), the MLP; then the merger's two linear layers per 2 x 2 unit."""
        v = config.hf_vision_config()
        rows, cols = self.grid(config, size)
        if steps_of(size) > 1:  # a video's steps run through the tower apart (attention per step)
            return {part: steps_of(size) * flops for part, flops in self.vision_flops(config, (1, *size[1:])).items()}
        merge = v.spatial_merge_size
        n = rows * cols * merge**2
        width = self.tower_width(v)
        embed = 2 * n * v.in_channels * v.temporal_patch_size * v.patch_size**2 * width
        segments = self.attention_segments(config, rows * merge, cols * merge)
        blocks = sum(8 * n * width**2 + 4 * sum(s * s for s in lengths) * width + self.mlp_flops(v, n) for lengths in segments)
        unit = width * merge**2
        return {"tower": embed + blocks, "projector": 2 * rows * cols * (unit * unit + unit * self.merged_width(v))}

    def tower_width(self, vision) -> int:
        return vision.embed_dim

    def mlp_flops(self, vision, n: int) -> int:
        """A block's MLP on `n` patches (Qwen2-VL: two matrices, embed_dim * mlp_ratio wide)."""
        return 4 * n * vision.embed_dim * int(vision.embed_dim * vision.mlp_ratio)

    def attention_segments(self, config: MLLMConfig, h: int, w: int) -> list[list[int]]:
        """Per block, the lengths of the segments its attention runs over for one h x w patch image
        (Qwen2-VL: the whole image in every block)."""
        return [[h * w]] * config.hf_vision_config().depth

    # --- the tower ------------------------------------------------------------------------------
    def unit_order(self, tower, grids: Tensor, units: int | None = None) -> Tensor:
        """The merge units (`units` of them: the host's count; None: from `grids`) in the order the tower
        holds them (Qwen2-VL: raster order)."""
        units = int(grids.prod(-1).sum()) // tower.spatial_merge_size**2 if units is None else units
        return torch.arange(units, device=grids.device)

    def block_seqlens(self, tower, block: int, full: Tensor, windows: Tensor | None) -> Tensor:
        """The attention segments of one block (Qwen2-VL: each image)."""
        return full

    def window_seqlens(self, tower, grids: Tensor) -> Tensor | None:
        return None

    def embed_patches(self, tower, pixel_values: Tensor, grids: Tensor) -> Tensor:
        """The tower's input tokens [sum t*h*w, width] (Qwen2-VL: the patch embedding)."""
        return tower.patch_embed(pixel_values)

    def captured_blocks(self, tower) -> tuple[int, ...]:
        """Tower blocks whose outputs `injections` reads (Qwen2-VL: none)."""
        return ()

    def run_tower(self, tower, pixel_values: Tensor, grids: Tensor, dominance: bool,
                  sizes: list[tuple[int, int, int]] | None = None) -> "TowerOutput":
        """transformers' tower forward without its merger(s), block by block (`TowerOutput`); `sizes`: the
        grids as the host knows them (None: read from `grids`), which size the patches' positions and
        attention segments."""
        sizes = sizes or [tuple(int(v) for v in g) for g in grids.tolist()]
        unit = tower.spatial_merge_size**2
        order = self.unit_order(tower, grids, len(pixel_values) // unit)
        x = self.embed_patches(tower, pixel_values, grids)
        cos, sin = tower.rotary_pos_emb(x, vision_position_ids(sizes, tower.spatial_merge_size, x.device))
        x, cos, sin = (t.view(-1, unit, t.shape[-1])[order].flatten(0, 1) for t in (x, cos, sin))
        full = on_device(list(accumulate([h * w for t, h, w in sizes for _ in range(t)], initial=0)), x.device).int()
        windows = self.window_seqlens(tower, grids)
        seen = {}
        hook = None
        if dominance:
            def read(module, args, kwargs, output):
                with torch.no_grad():
                    seen["received"] = attention_received(module, args[0] if args else kwargs["hidden_states"],
                                                          kwargs["position_embeddings"], full)
            hook = tower.blocks[-1].attn.register_forward_hook(read, with_kwargs=True)
        captured, wanted = {}, self.captured_blocks(tower)
        try:
            for i, block in enumerate(tower.blocks):
                x = block(x, cu_seqlens=self.block_seqlens(tower, i, full, windows), position_embeddings=(cos, sin))
                if i in wanted:
                    captured[i] = x
        finally:
            if hook is not None:
                hook.remove()
        return TowerOutput(x, order, seen.get("received"), captured)

    # --- preprocessing --------------------------------------------------------------------------
    def image_processor(self, config: MLLMConfig) -> ImageProcessor:
        return SmartResize(config)

    def video_processor(self, config: MLLMConfig) -> VideoProcessor:
        return FrameResize(config)

    def frames_per_item(self, config: MLLMConfig, image_sizes: Tensor) -> list[int]:
        return [int(t) * config.hf_vision_config().temporal_patch_size for t in image_sizes[:, 0].tolist()]

    def take_steps(self, config: MLLMConfig, pixel_values: Tensor, image_sizes: Tensor, steps: list[list[int]]) -> tuple[Tensor, Tensor]:
        parts = pixel_values.split(image_sizes.prod(-1).tolist())
        kept = [part.view(t, h * w, -1)[own].flatten(0, 1) for part, (t, h, w), own in zip(parts, image_sizes.tolist(), steps)]
        sizes = image_sizes.clone()
        sizes[:, 0] = torch.tensor([len(own) for own in steps], device=sizes.device)
        return torch.cat(kept), sizes

    def reorder_frames(self, config: MLLMConfig, pixel_values: Tensor, image_sizes: Tensor, orders: list[Tensor]) -> Tensor:
        """A step's patch row holds (channel, frame slot, p, p): frames are (step, slot) pairs."""
        slots = config.hf_vision_config().temporal_patch_size
        out = []
        for part, (t, h, w), order in zip(pixel_values.split(image_sizes.prod(-1).tolist()), image_sizes.tolist(), orders):
            frames = part.view(t, h * w, 3, slots, -1).permute(0, 3, 1, 2, 4).reshape(t * slots, h * w, 3, -1)
            frames = frames[order.to(frames.device)]
            out.append(frames.view(t, slots, h * w, 3, -1).permute(0, 2, 3, 1, 4).reshape(t * h * w, -1))
        return torch.cat(out)

    def rope_positions(self, config: MLLMConfig, attention_mask: Tensor, is_image: Tensor, image_sizes: Tensor | None,
                       step_seconds: Tensor | None = None) -> Tensor:
        """M-RoPE ids [3, B, L] (padding 0), row by row with `mrope_row` under `config.mrope_rule`;
        `image_sizes` are the row-ordered items' grids (t, h, w) and `step_seconds` [n] the seconds
        each item's temporal step spans (videos; what places them in time, `step_times`)."""
        from ..mllm import images_of_rows  # the model module builds on this one

        valid = attention_mask.bool()
        positions = torch.zeros(3, *valid.shape, dtype=torch.long, device=valid.device)
        per_row = is_image.sum(1)
        merge = config.hf_vision_config().spatial_merge_size
        grids = image_sizes if image_sizes is not None and int(per_row.sum()) else None
        times = []
        if grids is not None:
            counts = grids.prod(-1) // merge**2
            rows = images_of_rows(per_row, counts.to(per_row.device), config.image_token_id)
            seconds = [None] * len(grids) if step_seconds is None else step_seconds.reshape(-1).float().cpu()
            times = [self.step_times(config, int(g[0]), s) for g, s in zip(grids.tolist(), seconds)]
        for b in range(valid.shape[0]):
            own = [i for i in range(len(times)) if int(rows[i]) == b]
            grid = grids[own] if grids is not None else torch.zeros(0, 3, dtype=torch.long)
            positions[:, b, valid[b]] = mrope_row(is_image[b, valid[b]], grid, merge, config.mrope_rule, [times[i] for i in own])
        return positions

    def step_times(self, config: MLLMConfig, steps: int, seconds: Tensor | None) -> Tensor:
        """Time offsets [steps] of an item's temporal grid steps in M-RoPE's t (Qwen2-VL: the step
        index, whatever the seconds)."""
        return torch.arange(steps)

    # --- training and parallelism ---------------------------------------------------------------
    def vision_layers(self, model) -> list[nn.Module]:
        return list(model.vision_tower.blocks)


def vision_position_ids(sizes: list[tuple[int, int, int]], merge: int, device) -> Tensor:
    """[sum t*h*w, 2] each patch's (row, column) on its image's grid, in merge-block order, every step
    alike: transformers' `get_vision_position_ids`, built on `device` from the host's grids."""
    out = []
    for t, h, w in sizes:
        rows = torch.arange(h, device=device)[:, None].expand(h, w)
        cols = torch.arange(w, device=device)[None].expand(h, w)
        blocks = [p.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).flatten() for p in (rows, cols)]
        out.append(torch.stack(blocks, -1).repeat(t, 1))
    return torch.cat(out)


class TowerOutput(NamedTuple):
    """The tower's work on a batch of images: patch features [sum t*h*w, width] in tower order, the
    order of their merge units, (for `dominance`) the attention each patch receives in the last block
    within its image [sum t*h*w], and the outputs of the blocks the family captures (DeepStack)."""

    features: Tensor
    unit_order: Tensor
    received: Tensor | None
    captured: dict[int, Tensor]


def attention_received(attn: nn.Module, x: Tensor, position_embeddings: tuple[Tensor, Tensor], segments: Tensor) -> Tensor:
    """[N]: the attention each token gets in a Qwen vision attention module on its input `x` [N, d],
    within its segment (`segments`: cumulative lengths, one per image), averaged over heads and
    queries; what VisionZip reads from a tower without a CLS token."""
    n = x.shape[0]
    q, k, _ = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
    out = []
    bounds = segments.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        received = q.new_zeros(end - start, dtype=torch.float32)
        for head in range(attn.num_heads):  # one [n_i, n_i] matrix at a time (9216 patches: 0.3 GB, not 5 GB)
            qs, ks = q[start:end, head].float(), k[start:end, head].float()
            received += torch.softmax(qs @ ks.T * attn.scaling, dim=-1).mean(0)
        out.append(received / attn.num_heads)
    return torch.cat(out)
