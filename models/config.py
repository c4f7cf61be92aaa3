"""Validated model configuration.

`MLLMConfig` describes vision tower -> projector -> LLM with Hugging Face field names for the two
backbones (the same names a user sees in a checkpoint's `config.json`), so presets read like HF
configs while unknown keys fail loudly instead of being silently stored as attributes (which is what
HF config classes do with typos).
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from transformers import CONFIG_MAPPING, LlavaConfig, PretrainedConfig

VISION_FAMILIES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
TEXT_FAMILIES = {"llama": "llama", "qwen2": "qwen2"}
PROJECTORS = ("mlp2x_gelu", "linear")
# LLaVA-1.5 preprocessing constants (CLIP); SigLIP uses 0.5 / 0.5.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it and says how to fix it."""


def check_keys(given: dict, allowed: set[str] | list[str], where: str) -> None:
    """Raise ConfigError naming every unknown key in `given`, with the closest valid spelling."""
    unknown = [k for k in given if k not in allowed]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, list(allowed), n=1)
        hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    raise ConfigError(f"unknown key(s) in {where}: {', '.join(hints)}. Valid keys: {sorted(allowed)}")


def check_types(obj: Any, where: str) -> None:
    """Raise ConfigError naming the first field of dataclass `obj` whose value does not have its
    annotated type (ints pass as floats; `X | None`, tuples, lists and dicts are checked one level
    deep), so `optim.lr=abc` fails at config time instead of deep inside the optimizer."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value, expected = getattr(obj, f.name), hints.get(f.name, Any)
        if not _matches(value, expected):
            raise ConfigError(f"{where}.{f.name} must be {_describe(expected)}, got {value!r} ({type(value).__name__})")


def _matches(value: Any, expected: Any) -> bool:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if expected is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if expected is type(None):
        return value is None
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        item_types = args[:1] if origin is list or (len(args) == 2 and args[1] is Ellipsis) else args
        if origin is tuple and item_types != args[:1] and len(value) != len(item_types):
            return False
        return all(_matches(v, item_types[min(i, len(item_types) - 1)]) for i, v in enumerate(value)) if item_types else True
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(expected, type):
        return isinstance(value, expected)
    return True


def _describe(expected: Any) -> str:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if expected is type(None):
        return "null"
    names = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}
    if expected in names:
        return names[expected]
    if origin in (list, tuple):
        return f"a list whose items are {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    return getattr(expected, "__name__", str(expected))


def _hf_config(section: dict, families: dict[str, str], where: str) -> PretrainedConfig:
    section = dict(section)
    model_type = section.pop("model_type", None)
    if model_type not in families:
        raise ConfigError(f"{where}.model_type must be one of {sorted(families)}, got {model_type!r}")
    config_cls = CONFIG_MAPPING[model_type]
    check_keys(section, set(config_cls().to_dict()) - {"model_type"}, where)
    return config_cls(**section)


@dataclass
class MLLMConfig:
    """Vision tower -> projector -> causal LM, LLaVA style.

    `vision` and `text` hold HF config fields (with `model_type`), e.g. a SigLIP/CLIP vision config
    and a Llama/Qwen2 text config. Feature selection follows LLaVA-1.5: take hidden states of
    `vision_feature_layer` (-2 = penultimate) and drop the CLS token with strategy `default`.
    """

    vision: dict[str, Any]
    text: dict[str, Any]
    projector: str = "mlp2x_gelu"
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    image_token_id: int = 3
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vision = dict(self.vision)
        self.text = dict(self.text)
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)
        vision, text = self.hf_vision_config(), self.hf_text_config()
        if self.projector not in PROJECTORS:
            raise ConfigError(f"model.projector must be one of {PROJECTORS}, got {self.projector!r}")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError("model.vision_feature_select_strategy must be 'default' (drop CLS) or 'full'")
        if self.vision_family == "siglip" and self.vision_feature_select_strategy == "default":
            raise ConfigError(
                "SigLIP has no CLS token, so vision_feature_select_strategy='default' would drop a real "
                "patch; set model.vision_feature_select_strategy=full"
            )
        n_layers = vision.num_hidden_layers
        if not -n_layers <= self.vision_feature_layer <= n_layers or self.vision_feature_layer == -n_layers - 1:
            raise ConfigError(
                f"model.vision_feature_layer={self.vision_feature_layer} is outside the vision tower's "
                f"{n_layers} layers (use -1..-{n_layers} or 0..{n_layers})"
            )
        if vision.image_size % vision.patch_size:
            raise ConfigError(f"vision image_size {vision.image_size} is not a multiple of patch_size {vision.patch_size}")
        if not 0 <= self.image_token_id < text.vocab_size:
            raise ConfigError(f"model.image_token_id={self.image_token_id} is outside the vocabulary ({text.vocab_size})")
        if any(t != "full_attention" for t in getattr(text, "layer_types", None) or []):
            raise ConfigError("sliding-window attention layers are not supported; set text.use_sliding_window=false")

    # --- derived quantities -------------------------------------------------------------------
    @property
    def vision_family(self) -> str:
        return VISION_FAMILIES[self.vision["model_type"]]

    @property
    def text_family(self) -> str:
        return TEXT_FAMILIES[self.text["model_type"]]

    @property
    def grid_size(self) -> int:
        """Patches per side of the (square) image grid."""
        v = self.hf_vision_config()
        return v.image_size // v.patch_size

    @property
    def has_cls(self) -> bool:
        return self.vision_family == "clip"

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens the LLM receives per image (before any pruning)."""
        keep_cls = self.has_cls and self.vision_feature_select_strategy == "full"
        return self.grid_size**2 + int(keep_cls)

    @property
    def vision_layers_used(self) -> int:
        """Vision encoder layers that must run to reach `vision_feature_layer` (later ones are skipped)."""
        n = self.hf_vision_config().num_hidden_layers
        return self.vision_feature_layer % (n + 1)

    # --- HF configs -----------------------------------------------------------------------------
    def hf_vision_config(self) -> PretrainedConfig:
        config = _hf_config(self.vision, VISION_FAMILIES, "model.vision")
        if hasattr(config, "vision_use_head"):
            config.vision_use_head = False  # SigLIP's pooling head is never used by a LLaVA-style model
        return config

    def hf_text_config(self) -> PretrainedConfig:
        return _hf_config(self.text, TEXT_FAMILIES, "model.text")

    def hf_llava_config(self) -> LlavaConfig:
        """The equivalent HF `LlavaConfig` (what `save_pretrained` writes into config.json)."""
        return LlavaConfig(
            vision_config=self.hf_vision_config().to_dict(),
            text_config=self.hf_text_config().to_dict(),
            image_token_index=self.image_token_id,
            vision_feature_layer=self.vision_feature_layer,
            vision_feature_select_strategy=self.vision_feature_select_strategy,
            projector_hidden_act="gelu",
            image_seq_length=self.num_image_tokens,
            tie_word_embeddings=self.hf_text_config().tie_word_embeddings,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MLLMConfig":
        d = dict(d)
        check_keys(d, {f.name for f in fields(cls)}, "model")
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "MLLMConfig":
        """Build from a llava `config.json` dict (llava-hf checkpoints and our own exports)."""
        ours = hf.get("efficient_mllm", {})
        vision = _known_fields(hf["vision_config"])
        text = _known_fields(hf["text_config"])
        feature_layer = hf.get("vision_feature_layer", -2)
        if not isinstance(feature_layer, int):
            raise ConfigError(f"multi-layer vision_feature_layer {feature_layer} is not supported")
        mean, std = (0.5,) * 3, (0.5,) * 3
        if vision["model_type"] == "clip_vision_model":
            mean, std = CLIP_MEAN, CLIP_STD
        return cls(
            vision=vision,
            text=text,
            projector=ours.get("projector", "mlp2x_gelu"),
            vision_feature_layer=feature_layer,
            vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
            image_token_id=hf.get("image_token_index", hf.get("image_token_id")),
            image_mean=tuple(ours.get("image_mean", mean)),
            image_std=tuple(ours.get("image_std", std)),
            extra=ours.get("extra", {}),
        )

    def with_backbones(self, vision: PretrainedConfig | None = None, text: PretrainedConfig | None = None) -> "MLLMConfig":
        """This config with the vision and/or text section taken from a checkpoint's HF config (every
        field we know, so shapes come from the checkpoint); projector and the rest stay."""
        sections = {}
        for name, hf in (("vision", vision), ("text", text)):
            if hf is not None:
                sections[name] = _known_fields({**hf.to_dict(), "model_type": hf.model_type})
        return replace(self, **sections)

    def to_hf_dict(self) -> dict[str, Any]:
        d = self.hf_llava_config().to_dict()
        d["efficient_mllm"] = {k: v for k, v in asdict(self).items() if k in ("projector", "image_mean", "image_std", "extra")}
        return d


def _known_fields(section: dict[str, Any]) -> dict[str, Any]:
    """Keep only the fields of an HF sub-config that matter (drop bookkeeping keys HF adds on save)."""
    model_type = section["model_type"]
    allowed = set(CONFIG_MAPPING[model_type]().to_dict())
    skip = {"transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype", "id2label", "label2id"}
    return {k: v for k, v in section.items() if k in allowed and k not in skip}
