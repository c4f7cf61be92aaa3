"""The family seam: what a model family provides to the family-agnostic plan engine.

A family (LLaVA-1.5, LLaVA-NeXT, ...) turns pixels and a prompt into *visual tokens with a place*
and positions; everything after that (plans, the decoder, the KV cache, FLOPs, training) is shared.
One module per family in `models/families/` subclasses `Family` and declares:

* configuration: the HF `model_type` it reads and writes (config.json), the vision/text model types
  it accepts, and its own checks (`validate`);
* modules and weights: the visual front-end it attaches to the `MLLM` (tower, projector, learned
  extras such as LLaVA-NeXT's `image_newline`) and the state-dict adapter between HF weight names
  and ours (`to_internal_name` / `to_hub_name`);
* visual tokens: `encode` (pixels -> projected tokens + their `Place`: image, token, tile/unit,
  row/column on the unit's grid, layout tokens) and `tokens_per_image` (how many placeholder
  tokens an image of a given size takes in the prompt), and what they cost before the LLM
  (`vision_flops`: the tower's and the projector's FLOPs for an image of a given size);
* positions: `rope_positions` (1-D sequence positions, or Qwen's 3-D M-RoPE (t, h, w) ids from the
  prompt's image placeholders and grids), computed once per prompt and kept apart from the sequence
  order that causality uses;
* preprocessing: `image_processor` (transformers' PIL image processor of the family, or LLaVA-1.5's
  pad-to-square), which also reports each image's size;
* training and parallelism: the tower's sharding units and the modules that never reach the LLM.

docs/adding-a-model-family.md walks through a family with LLaVA-NeXT as the worked example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .streams import Place
from .validation import ConfigError

# Annotations name `MLLMConfig` (models/config.py), `MLLM` (models/mllm.py) and PIL's `Image` as
# strings: both modules build on this one, which therefore imports neither.


class VisualTokens(NamedTuple):
    """Every image of a batch, in batch order, as the LLM receives it (one entry per placeholder).

    `h` [T, d]: projected tokens, T = sum of `counts`; `place` [T, len(Place)] (long): each token's
    image-local place (PATCH = index in its image's span, UNIT, ROW, COL, EXTRA); `counts` [n_images]
    (long): placeholder tokens per image; `keep` [T] (bool) or None: which entries enter the LLM
    after a pre-LLM step (pruning keeps tokens in their slots; pooling writes the pooled tokens into
    the first slots of each image). `scores`: per-token scores a pre-LLM step asked the family for
    ("dominance": the tower's attention to each token; "cls_similarity": cosine to its unit's CLS).
    `inject` [T, K, d] or None: features added to each token after decoder layers 0..K-1 (Qwen3-VL's
    DeepStack; `models.streams.injected`)."""

    h: Tensor
    place: Tensor
    counts: Tensor
    keep: Tensor | None = None
    scores: dict[str, Tensor] | None = None
    inject: Tensor | None = None

    @property
    def image_of_token(self) -> Tensor:
        """[T]: batch index of each token's image."""
        return torch.repeat_interleave(torch.arange(len(self.counts), device=self.counts.device), self.counts, output_size=len(self.h))


def on_device(values: list[int], device) -> Tensor:
    """[n] long tensor of Python ints, filled on `device` rather than copied from host memory (a copy from
    pageable memory makes the host wait for the device's queue: models/dispatch_count.py)."""
    if not values:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([torch.full((1,), v, dtype=torch.long, device=device) for v in values])


def grid_place(rows: int, cols: int, *, unit: int = 0, first_patch: int = 0, time: int = 0, device=None) -> Tensor:
    """Places [rows * cols, len(Place)] of a raster-ordered `rows` x `cols` grid of one unit (the
    image-local columns a family fills; the model adds SLOT and IMAGE when it lays images into rows),
    at time step `time` of a video."""
    n = rows * cols
    place = torch.zeros(n, len(Place), dtype=torch.long, device=device)
    index = torch.arange(n, device=device)
    place[:, Place.PATCH] = first_patch + index
    place[:, Place.UNIT] = unit
    place[:, Place.ROW] = index // cols
    place[:, Place.COL] = index % cols
    place[:, Place.TIME] = time
    return place


def real_tiles(pixel_values: Tensor, n_tiles: list[int], sizes: list[tuple[int, int]]) -> Tensor:
    """The real tiles of every image concatenated [sum tiles, 3, S, S], from transformers' padded
    layout [n_images, max_tiles, 3, S, S] (LLaVA-NeXT; our collator) or already flat (InternVL's
    `pixel_values`); `n_tiles` per image (of `sizes`, named in the error)."""
    if pixel_values.dim() == 5:
        if pixel_values.shape[0] != len(n_tiles) or pixel_values.shape[1] < max(n_tiles):
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} do not hold the tiles of {len(sizes)} images of "
                             f"sizes {sizes} ({n_tiles} tiles)")
        return torch.cat([p[:n] for p, n in zip(pixel_values, n_tiles)])
    if pixel_values.dim() == 4 and pixel_values.shape[0] == sum(n_tiles):
        return pixel_values
    raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected [n_images, tiles, 3, H, W] or "
                     f"[{sum(n_tiles)} tiles, 3, H, W] for images of sizes {sizes} ({n_tiles} tiles)")


def normalisation(preprocessor: dict[str, Any]) -> dict[str, Any]:
    """The `image_mean` / `image_std` an image processor's preprocessor_config.json normalises with."""
    return {k: tuple(preprocessor[k]) for k in ("image_mean", "image_std") if k in preprocessor}


def tiles_by_image(family: "Family", config: "MLLMConfig", pixel_values: Tensor | None,
                   image_sizes: Tensor | None) -> Tensor | None:
    """A tiling family's `Family.image_pixels`: [n_images, max tiles, 3, S, S], flat tiles [sum tiles, 3, S, S]
    regrouped per image by `family.tiles_per_image` (zero tiles after each image's own, as transformers' padded
    layout has them); the padded layout, or pixels without sizes, as they are."""
    if pixel_values is None or image_sizes is None or pixel_values.dim() != 4:
        return pixel_values
    n_tiles = [family.tiles_per_image(config, s) for s in image_sizes.tolist()]
    return torch.nn.utils.rnn.pad_sequence(list(pixel_values.split(n_tiles)), batch_first=True)


def placeholder_runs(input_ids: Tensor, attention_mask: Tensor, image_token_id: int) -> Tensor:
    """Lengths [n_runs] of the runs of consecutive placeholder tokens, row by row, in order."""
    is_image = F.pad((input_ids == image_token_id) & attention_mask.bool(), (0, 1)).flatten().long()  # rows apart
    run = torch.cumsum(is_image.diff(prepend=is_image.new_zeros(1)) == 1, 0)
    return torch.bincount(run[is_image.bool()], minlength=1)[1:]


@dataclass(frozen=True)
class ProcessedImage:
    """One image as the model takes it: `pixels` ([3, H, W], or [tiles, 3, H, W] for tiling
    families) and its original `size` (height, width), which decides its token count."""

    pixels: Tensor
    size: tuple[int, int]


@dataclass(frozen=True)
class ProcessedVideo:
    """One video as the model takes it: `pixels` (Qwen: [t*h*w, patch pixels], transformers'
    `pixel_values_videos` layout), its patch grid `size` (t, h, w) and `step_seconds`, the seconds one
    temporal grid step spans (its frames / the sampled fps): what places its steps in time; `timestamps`:
    each step's time in the source video in seconds (the mean of its frames'), which Qwen3-VL's prompts
    write before each step."""

    pixels: Tensor
    size: tuple[int, int, int]
    step_seconds: float
    timestamps: tuple[float, ...] = ()


class Family:
    """Base class of the model families (see the module docstring for the contract)."""

    name: ClassVar[str]  # `model.config.family`
    hf_model_type: ClassVar[str]  # config.json `model_type`
    hf_architecture: ClassVar[str]  # config.json `architectures[0]` of what `save_pretrained` writes
    vision_types: ClassVar[dict[str, str]]  # HF vision model_type -> our short name
    text_types: ClassVar[dict[str, str]]  # HF text model_type -> our short name
    variable_tokens: ClassVar[bool] = False  # tokens per image depend on its size
    renumbers_positions: ClassVar[bool] = True  # 1-D positions: a selection may renumber them (PyramidDrop)
    mrope: ClassVar[bool] = False  # 3-D M-RoPE positions (Qwen), whose rule `MLLMConfig.mrope_rule` names
    image_wrap: ClassVar[tuple[str, str] | None] = None  # text tokens the prompt writes around each image's tokens
    video_token: ClassVar[str | None] = None  # the special token a video's placeholders are (Qwen: <|video_pad|>); None: no video
    frame_timestamps: ClassVar[bool] = False  # a video's steps are written apart after their timestamps (Qwen3-VL): the
                                              # model takes such prompts, the data path and lmms-eval prompts do not write them yet
    hf_processor_class: ClassVar[str | None] = None  # preprocessor_config.json `processor_class` (tiling families)
    original_layout: ClassVar[bool] = False  # the original LLaVA layout is its only one (no transformers class reads it)

    # --- configuration ------------------------------------------------------------------------
    def validate(self, config: "MLLMConfig") -> None:
        """Raise ConfigError for settings this family cannot run."""

    def hf_config(self, config: "MLLMConfig"):
        """The transformers config object `save_pretrained` writes."""
        raise NotImplementedError

    def config_fields(self, hf: dict[str, Any]) -> dict[str, Any]:
        """`MLLMConfig` fields read from a config.json of this family (beyond vision/text)."""
        raise NotImplementedError

    def adapt_backbones(self, config: "MLLMConfig", vision: dict[str, Any] | None,
                        text: dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The vision and text sections of `config`'s model when its tower and / or LLM come from their own
        checkpoints (`MLLM.from_components`: their config.json fields, None for a part not given), as this
        family runs them (Qwen: a Qwen2 LLM as its M-RoPE text model, the merger as wide as the LLM); a
        ConfigError naming the part it cannot take."""
        if vision is not None and vision["model_type"] not in self.vision_types:
            raise ConfigError(f"the vision checkpoint holds a tower of type {vision['model_type']}, which the {self.name} family "
                              f"does not take ({', '.join(self.vision_types)}): give one of those, or a family that takes it")
        if text is not None and text["model_type"] not in self.text_types:
            raise ConfigError(f"the LLM checkpoint is a model of type {text['model_type']}, which the {self.name} family does not "
                              f"take ({', '.join(self.text_types)}): give one of those, or a family that takes it")
        return vision, text

    def processor_fields(self, preprocessor: dict[str, Any]) -> dict[str, Any]:
        """`MLLMConfig` fields that a directory's preprocessor_config.json sets (what transformers' image
        processor of a directory it wrote does; our exports record them in config.json too)."""
        return {}

    def current_hf_dict(self, hf: dict[str, Any]) -> dict[str, Any]:
        """A config.json in the layout today's transformers writes (`vision_config`, `text_config`), for
        families whose Hub checkpoints keep an older one (Qwen2-VL's text fields at the top level)."""
        return hf

    # --- modules and weights --------------------------------------------------------------------
    def build(self, model: "MLLM") -> None:
        """Attach the visual front-end's modules to `model` (HF module names)."""
        raise NotImplementedError

    def init_weights(self, model: "MLLM") -> None:
        """Initialise the weights the family adds (projector, learned extras); HF's own modules
        were initialised by transformers."""

    def to_internal_name(self, key: str) -> str:
        raise NotImplementedError

    def to_hub_name(self, key: str) -> str:
        raise NotImplementedError

    def dropped_on_load(self, key: str) -> bool:
        """On-disk tensors the model never uses (e.g. SigLIP's pooling head)."""
        return False

    # --- visual tokens --------------------------------------------------------------------------
    def tokens_per_image(self, config: "MLLMConfig", size: tuple[int, int] | None = None) -> int:
        """Placeholder tokens of one image of `size` (height, width) in the prompt."""
        raise NotImplementedError

    def image_wrap_ids(self, config: "MLLMConfig") -> tuple[int, int] | None:
        """The ids the model's config fixes for the `image_wrap` tokens (Qwen's vision start / end),
        which the tokenizer must agree with; None: only the tokenizer knows them (InternVL)."""
        return None

    def image_places(self, config: "MLLMConfig", size: tuple[int, int] | None = None) -> Tensor:
        """The places [n, len(Place)] of one image's tokens (what `encode` gives it), for FLOPs and
        token accounting without pixels (`models.flops.ImageTokens.from_places`)."""
        raise NotImplementedError

    def encode(self, model: "MLLM", pixel_values: Tensor, image_sizes: Tensor | None, scores: str | None = None,
               sizes: list[tuple[int, ...]] | None = None) -> VisualTokens:
        """Projected visual tokens of every image and their places; `scores` names a per-token
        score a pre-LLM step needs ("dominance", "cls_similarity"); `sizes`: the rows of `image_sizes`
        as the host knows them (`BatchSizes.item_sizes`: no read back), None: read them."""
        raise NotImplementedError

    def image_count(self, pixel_values: Tensor | None, image_sizes: Tensor | None) -> int:
        return 0 if pixel_values is None else pixel_values.shape[0]

    def sizes_from_prompt(self, config: "MLLMConfig", input_ids: Tensor, attention_mask: Tensor,
                          pixel_values: Tensor) -> Tensor | None:
        """What stands for `image_sizes` when a batch comes without them, read from the prompt (a host
        sync, so only families that need it read anything: `placeholder_runs`). InternVL's forward in
        transformers takes no sizes, so its tile counts follow from the prompt; None: the family needs
        no sizes, or must be given them (its `encode` says so)."""
        return None

    def vision_flops(self, config: "MLLMConfig", size: tuple[int, int]) -> dict[str, int]:
        """Forward FLOPs (2 x multiply-accumulates) of one image of `size` (height, width), all its
        tiles: {"tower": ..., "projector": ...}, counted by `models/vision_flops.py`. They do not
        depend on the plan (pre-LLM steps act after the projector)."""
        raise NotImplementedError(f"the {self.name} family does not count its tower's and projector's FLOPs")

    def hf_image_inputs(self, config: "MLLMConfig", input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor,
                        image_sizes: Tensor | None) -> dict[str, Tensor]:
        """The image inputs transformers' class of the family (`hf_architecture`) takes for a batch of
        ours: what timing it against us (`python -m train bench bench.hf=true`) feeds it."""
        return {"pixel_values": pixel_values}

    def image_pixels(self, config: "MLLMConfig", pixel_values: Tensor | None, image_sizes: Tensor | None) -> Tensor | None:
        """`pixel_values` with one leading entry per image (zero padding after each image's own
        pixels): what random selections key each image on (`models.blind_scores.image_keys`)."""
        return pixel_values

    # --- positions ------------------------------------------------------------------------------
    def rope_positions(self, config: "MLLMConfig", attention_mask: Tensor, is_image: Tensor, image_sizes: Tensor | None,
                       step_seconds: Tensor | None = None) -> Tensor:
        """RoPE position ids of the prompt tokens: [B, L] for 1-D families (the sequence order over
        `attention_mask`), or [3, B, L] for M-RoPE, where `is_image` [B, L] marks the placeholder
        tokens, `image_sizes` describes the row-ordered images and videos and `step_seconds` the
        seconds each one's temporal step spans (a rule of one row at a time, so packed samples can
        restart it). Padding gets position 0."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    # --- video ----------------------------------------------------------------------------------
    def visual_token_ids(self, config: "MLLMConfig") -> tuple[int, ...]:
        """The placeholder ids visual tokens take in the prompt (Qwen: the image's and the video's)."""
        return (config.image_token_id,)

    def visual_items(self, config: "MLLMConfig", input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None,
                     image_sizes: Tensor | None, videos: tuple[Tensor, Tensor, Tensor | None]):
        """transformers' image and video inputs (`videos`: `pixel_values_videos`, `video_grid_thw`,
        `second_per_grid_ts`) as one `models.video.VisualItems` in prompt order, or None when there
        are none."""
        raise ValueError(f"the {self.name} family takes no video (pixel_values_videos); give the frames as images")


    # --- preprocessing --------------------------------------------------------------------------
    def image_processor(self, config: "MLLMConfig") -> "ImageProcessor":
        raise NotImplementedError

    def video_processor(self, config: "MLLMConfig") -> "VideoProcessor":
        raise ValueError(f"the {self.name} family takes no video; give the frames as images")

    def frames_per_item(self, config: "MLLMConfig", image_sizes: Tensor) -> list[int]:
        """Frames each item's pixels hold (a still image: as many as a video step)."""
        raise ValueError(f"the {self.name} family takes no video")

    def take_steps(self, config: "MLLMConfig", pixel_values: Tensor, image_sizes: Tensor, steps: list[list[int]]) -> tuple[Tensor, Tensor]:
        """The pixels and sizes of the items with only their time steps `steps[i]` (uniform frame
        subsampling before the tower)."""
        raise ValueError(f"the {self.name} family takes no video")

    def reorder_frames(self, config: "MLLMConfig", pixel_values: Tensor, image_sizes: Tensor, orders: list[Tensor]) -> Tensor:
        """The items' pixels with item i's frames taken in `orders[i]` (frame indices, repeats allowed):
        the evaluation's shuffled and single-frame video controls."""
        raise ValueError(f"the {self.name} family takes no video")

    # --- training and parallelism ---------------------------------------------------------------
    def vision_layers(self, model: "MLLM") -> list[nn.Module]:
        """The tower's repeated blocks (FSDP units)."""
        raise NotImplementedError

    def projector_extras(self, model: "MLLM") -> list[nn.Parameter]:
        """Learned visual parameters outside the projector module that train with it (stage=pretrain)."""
        return []

    def unused_vision_modules(self, model: "MLLM") -> list[nn.Module]:
        """Tower modules after the feature layer: they never reach the LLM (no gradient)."""
        return []


class ImageProcessor:
    """PIL image -> `ProcessedImage` for one family and config (training, evaluation, lmms-eval)."""

    def __call__(self, image: "Image.Image") -> ProcessedImage:
        raise NotImplementedError


class VideoProcessor:
    """Sampled frames (uint8 [F, H, W, 3]), their fps and (optionally) each frame's time in the source
    video -> `ProcessedVideo` for one family and config."""

    def __call__(self, frames, fps: float, frame_times: list[float] | None = None) -> ProcessedVideo:
        raise NotImplementedError


FAMILIES: dict[str, Family] = {}  # `model.config.family` -> the family (filled by models/families/)


def register(family_class: type[Family]) -> type[Family]:
    """Class decorator: make a family available by its `name`."""
    FAMILIES[family_class.name] = family_class()
    return family_class


def family_for_model_type(model_type: str | None) -> Family:
    """The family whose checkpoints have this config.json `model_type` (a clear error otherwise)."""
    for family in FAMILIES.values():
        if family.hf_model_type == model_type:
            return family
    known = sorted(f.hf_model_type for f in FAMILIES.values())
    raise ConfigError(
        f"config.json has model_type {model_type!r}, not one of the families this framework runs ({', '.join(known)}). "
        "For separate vision and language checkpoints set model.vision_pretrained and model.llm_pretrained instead."
    )
