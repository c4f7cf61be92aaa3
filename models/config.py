"""Validated model configuration.

`MLLMConfig` describes vision tower -> projector -> LLM with Hugging Face field names for the two
backbones (the same names a user sees in a checkpoint's `config.json`), so presets read like HF
configs while unknown keys fail loudly instead of being silently stored as attributes (which is what
HF config classes do with typos).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from transformers import CONFIG_MAPPING, PretrainedConfig

from .family import FAMILIES, family_for_model_type
from .layer_kinds import layer_kinds
from .validation import ConfigError, check_keys, check_types

__all__ = ["MLLMConfig", "ConfigError", "check_keys", "check_types", "CLIP_MEAN", "CLIP_STD", "PROJECTORS"]

PROJECTORS = ("mlp2x_gelu", "linear", "ldpnetv2")  # ldpnetv2: MobileVLM V2 (model.family=mobilevlm)
# LLaVA-1.5 preprocessing constants (CLIP); SigLIP uses 0.5 / 0.5.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# InternViT's (ImageNet) statistics; SigLIP and the rest use 0.5 / 0.5.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_STATS = {"clip_vision_model": (CLIP_MEAN, CLIP_STD), "internvl_vision": (IMAGENET_MEAN, IMAGENET_STD),
               "qwen2_vl_vision": (CLIP_MEAN, CLIP_STD), "qwen2_5_vl_vision": (CLIP_MEAN, CLIP_STD)}  # Qwen: OpenAI CLIP's


def _hf_config(section: dict, families: dict[str, str], where: str) -> PretrainedConfig:
    section = dict(section)
    model_type = section.pop("model_type", None)
    if model_type not in families:
        raise ConfigError(f"{where}.model_type must be one of {sorted(families)}, got {model_type!r}")
    config_cls = CONFIG_MAPPING[model_type]
    check_keys(section, config_keys(model_type) - {"model_type"}, where)
    return config_cls(**section)


def config_keys(model_type: str) -> set[str]:
    """The fields an HF config class takes: what it writes, plus the names its `attribute_map` aliases
    (Qwen3-MoE writes `num_local_experts` and reads the released configs' `num_experts`)."""
    config_cls = CONFIG_MAPPING[model_type]
    return set(config_cls().to_dict()) | set(getattr(config_cls, "attribute_map", {}))


@dataclass
class MLLMConfig:
    """Vision tower -> projector -> causal LM, in one of the model families (`models/families/`).

    `vision` and `text` hold HF config fields (with `model_type`), e.g. a SigLIP/CLIP vision config
    and a Llama/Qwen2 text config. `family` names the family module that turns pixels into visual
    tokens and reads/writes the checkpoint format (`llava`: LLaVA-1.5, `llava_next`: LLaVA-NeXT's
    anyres tiles). Feature selection follows LLaVA: take hidden states of `vision_feature_layer`
    (-2 = penultimate) and drop the CLS token with strategy `default`.
    """

    vision: dict[str, Any]
    text: dict[str, Any]
    family: str = "llava"
    projector: str = "mlp2x_gelu"
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    image_token_id: int = 3
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    image_grid_pinpoints: list[list[int]] | None = None  # llava_next: candidate canvases (height, width) in pixels
    max_tiles: int | None = None  # internvl: most tiles an image is cut into (GotOcr2's max_patches; None = 12)
    min_pixels: int | None = None  # qwen2_vl / qwen2_5_vl: the pixel bounds images are resized within (smart_resize)
    max_pixels: int | None = None
    tie_word_embeddings: bool | None = None  # None: the text config's (Qwen's configs hold it at the top level)
    token_ids: dict[str, int] = field(default_factory=dict)  # the family's other special tokens by HF config name
                                                              # (Qwen: vision_start_token_id, vision_end_token_id, video_token_id)
    video_min_pixels: int | None = None  # qwen2_vl / qwen2_5_vl: the pixel bounds of a video frame (None: the image's)
    video_max_pixels: int | None = None
    mrope_rule: str = "qwen"  # M-RoPE families: where text after a vision span continues (docs/video.md): `qwen`, one
                              # past the span's largest position (how Qwen trained its checkpoints), or `hf`,
                              # transformers >= 5.3's get_rope_index (start + max(h, w) / 2, overlapping long videos)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vision = dict(self.vision)
        self.text = dict(self.text)
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)
        if self.family not in FAMILIES:
            raise ConfigError(f"model.family must be one of {sorted(FAMILIES)}, got {self.family!r}")
        self.hf_vision_config()  # the sections' keys and model types are checked here
        text = self.hf_text_config()
        if self.projector not in PROJECTORS:
            raise ConfigError(f"model.projector must be one of {PROJECTORS}, got {self.projector!r}")
        if not 0 <= self.image_token_id < text.vocab_size:
            raise ConfigError(f"model.image_token_id={self.image_token_id} is outside the vocabulary ({text.vocab_size})")
        if self.mrope_rule not in ("qwen", "hf"):
            raise ConfigError(f"model.mrope_rule must be qwen (Qwen's original M-RoPE rule) or hf (transformers' get_rope_index), "
                              f"got {self.mrope_rule!r}")
        if self.mrope_rule != "qwen" and not self.model_family.mrope:
            raise ConfigError(f"model.mrope_rule={self.mrope_rule} only applies to M-RoPE families (Qwen); {self.family} has "
                              "1-D positions: drop it")
        layer_kinds(text)  # full and linear attention run; sliding windows do not
        self.model_family.validate(self)

    # --- derived quantities -------------------------------------------------------------------
    @property
    def model_family(self):
        """The `models.family.Family` of this config."""
        return FAMILIES[self.family]

    @property
    def vision_family(self) -> str:
        return self.model_family.vision_types[self.vision["model_type"]]

    @property
    def text_family(self) -> str:
        return self.model_family.text_types[self.text["model_type"]]

    @property
    def grid_size(self) -> int:
        """Patches per side of the (square) grid the tower sees (an image, or a tile)."""
        return self.tile_size // square_side(self.hf_vision_config().patch_size)

    @property
    def tile_size(self) -> int:
        """Pixels per side of the square the tower sees (InternViT's config gives [h, w]: square here)."""
        return square_side(self.hf_vision_config().image_size)

    @property
    def has_cls(self) -> bool:
        return self.vision_family in ("clip", "internvit")

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens the LLM receives per image (before any pruning), for families whose count
        does not depend on the image; `tokens_per_image(size)` for every family."""
        if self.model_family.variable_tokens:
            raise ValueError(f"family {self.family!r} gives each image as many tokens as its size needs: use "
                             "MLLMConfig.tokens_per_image((height, width))")
        return self.tokens_per_image()

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        """Placeholder ids of visual tokens in prompts (the image token; Qwen's video token too)."""
        return self.model_family.visual_token_ids(self)

    def tokens_per_image(self, size: tuple[int, int] | None = None) -> int:
        """Visual tokens (placeholders in the prompt) of one image of `size` (height, width)."""
        return self.model_family.tokens_per_image(self, size)

    @property
    def ties_embeddings(self) -> bool:
        """Whether the LM head shares the token embedding matrix."""
        if self.tie_word_embeddings is not None:
            return self.tie_word_embeddings
        return bool(getattr(self.hf_text_config(), "tie_word_embeddings", False))

    @property
    def vision_layers_used(self) -> int:
        """Vision encoder layers that must run to reach `vision_feature_layer` (later ones are skipped)."""
        n = self.hf_vision_config().num_hidden_layers
        return self.vision_feature_layer % (n + 1)

    # --- HF configs -----------------------------------------------------------------------------
    def hf_vision_config(self) -> PretrainedConfig:
        config = _hf_config(self.vision, self.model_family.vision_types, "model.vision")
        if hasattr(config, "vision_use_head"):
            config.vision_use_head = False  # SigLIP's pooling head is never used by a LLaVA-style model
        return config

    def hf_text_config(self) -> PretrainedConfig:
        return _hf_config(self.text, self.model_family.text_types, "model.text")

    def hf_config(self) -> PretrainedConfig:
        """The equivalent transformers config (`LlavaConfig`, `LlavaNextConfig`): what
        `save_pretrained` writes into config.json."""
        return self.model_family.hf_config(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MLLMConfig":
        d = dict(d)
        check_keys(d, {f.name for f in fields(cls)}, "model")
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> "MLLMConfig":
        """Build from a `config.json` dict of any family (checkpoints transformers wrote, and ours), and the
        directory's `preprocessor_config.json` (what its image processor does that config.json does not
        record: InternVL's max_patches, Qwen's pixel bounds; `Family.processor_fields`). Ours in config.json win."""
        family = family_for_model_type(hf.get("model_type"))
        hf = family.current_hf_dict(hf)
        ours = hf.get("efficient_mllm", {})
        vision = known_fields(hf["vision_config"])
        text = known_fields(hf["text_config"])
        fields_ = family.config_fields(hf)
        text.update(fields_.pop("text_overrides", {}))  # e.g. InternVL's top-level tie_word_embeddings
        mean, std = IMAGE_STATS.get(vision["model_type"], ((0.5,) * 3, (0.5,) * 3))
        fields_ = {"image_mean": mean, "image_std": std} | fields_ | family.processor_fields(preprocessor or {})
        fields_ |= {k: ours[k] for k in ("projector", "image_mean", "image_std", "extra", "max_tiles", "min_pixels", "max_pixels",
                                         "video_min_pixels", "video_max_pixels", "mrope_rule") if k in ours}
        return cls(vision=vision, text=text, family=family.name, **fields_)

    def with_backbones(self, vision: PretrainedConfig | None = None, text: PretrainedConfig | None = None) -> "MLLMConfig":
        """This config with the vision and/or text section taken from a checkpoint's HF config (every
        field we know, so shapes come from the checkpoint), as the family runs them
        (`Family.adapt_backbones`); projector and the rest stay."""
        vision, text = ({**hf.to_dict(), "model_type": hf.model_type} if hf is not None else None for hf in (vision, text))
        vision, text = self.model_family.adapt_backbones(self, vision, text)
        sections = {name: known_fields(s) for name, s in (("vision", vision), ("text", text)) if s is not None}
        return replace(self, **sections)

    def to_hf_dict(self) -> dict[str, Any]:
        d = self.hf_config().to_dict()
        d["efficient_mllm"] = {k: v for k, v in asdict(self).items() if k in ("projector", "image_mean", "image_std", "extra")}
        for name in ("max_tiles", "min_pixels", "max_pixels", "video_min_pixels", "video_max_pixels"):  # preprocessing bounds
            if getattr(self, name) is not None:
                d["efficient_mllm"][name] = getattr(self, name)
        if self.model_family.mrope:
            d["efficient_mllm"]["mrope_rule"] = self.mrope_rule
        return d


def square_side(value) -> int:
    """One side of a square size given as an int or as HF's [height, width]."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"vision image_size / patch_size {list(value)} must be square")
        return int(value[0])
    return int(value)


def known_fields(section: dict[str, Any]) -> dict[str, Any]:
    """Keep only the fields of an HF sub-config that matter (drop bookkeeping keys HF adds on save)."""
    allowed = config_keys(section["model_type"])
    skip = {"transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype", "id2label", "label2id"}
    return {k: v for k, v in section.items() if k in allowed and k not in skip}
