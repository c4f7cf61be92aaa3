"""The `model` config group as an object: which MLLM to build and how text reaches it.

A model either builds from `config` (random init), loads a checkpoint directory of any family (`pretrained`),
or combines separate vision / LLM directories (`vision_pretrained`, `llm_pretrained`) with a new
projector; the three routes are `MLLM.from_config / from_pretrained / from_components`. The
tokenizer is the checkpoint's (or `tokenizer`), else one trained on the task's text.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch

from data.chat import TEMPLATES, image_placeholder, wrap_ids
from data.tokenizer import load_pretrained_tokenizer, task_special_ids, task_tokenizer
from models import MLLM, MLLMConfig
from models.checkpoint import mismatch_message, mismatches, read_preprocessor
from models.original_layout import read_config, read_shapes
from models.compile import compile_decoder_layers
from models.mllm import check_plan
from models.packed_attention import BACKENDS
from models.family import family_for_model_type
from models.config import ConfigError, check_types
from models.methods import resolve_arch
from models.plan import Plan
from models.vision import init_sincos_positions

DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PREPROCESSING = ("min_pixels", "max_pixels", "max_tiles")  # resolution bounds a run may set on any model, a checkpoint included


@dataclass
class ModelSource:
    name: str
    config: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    vision_tower: str | None = None  # the CLIP directory of an original-layout `pretrained` (models/original_layout.py)
    vision_pretrained: str | None = None
    llm_pretrained: str | None = None
    tokenizer: str | None = None
    tokenizer_vocab_size: int = 1024
    chat_template: str = "vicuna"
    system_prompt: str | None = None
    dtype: str | None = None
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the decoder layers (models/compile.py)
    attention: str = "auto"  # packed rows' causal kernel: auto | sdpa | varlen (models/packed_attention.py)
    vision_position_init: str = "random"  # random | sincos2d (a tower built from config only)
    # images one sample may hold; None: any number (LLaVA-1.5 takes several per row, like HF's
    # LlavaForConditionalGeneration); samples with more are skipped and counted (too_many_images)
    max_images_per_sample: int | None = None
    # resolution bounds that replace the model's own, whether it is built from `config` or loaded from a
    # checkpoint (a fine-tuning recipe's pixel budget on a released model): keys of PREPROCESSING
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_types(self, "model")
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.chat_template not in TEMPLATES:
            raise ConfigError(f"model.chat_template must be one of {sorted(TEMPLATES)}, got {self.chat_template!r}")
        if self.attention not in BACKENDS:
            raise ConfigError(f"model.attention must be one of {list(BACKENDS)}, got {self.attention!r}")
        if self.vision_position_init not in ("random", "sincos2d"):
            raise ConfigError(f"model.vision_position_init must be 'random' or 'sincos2d', got {self.vision_position_init!r}")
        if self.max_images_per_sample is not None and self.max_images_per_sample < 1:
            raise ConfigError(f"model.max_images_per_sample must be >= 1 or null (no limit), got {self.max_images_per_sample}")
        unknown = sorted(set(self.preprocessing) - set(PREPROCESSING))
        if unknown:
            raise ConfigError(f"model.preprocessing: unknown key(s) {unknown}; it sets {list(PREPROCESSING)}")
        if self.pretrained and (self.vision_pretrained or self.llm_pretrained):
            raise ConfigError("set either model.pretrained (a llava directory) or model.vision_pretrained/llm_pretrained, not both")
        if self.vision_tower and not self.pretrained:
            raise ConfigError("model.vision_tower is the CLIP directory of an original-layout model.pretrained checkpoint; set "
                              "model.pretrained too (or model.vision_pretrained to start from a separate tower)")

    @cached_property
    def mllm_config(self) -> MLLMConfig:
        """The model's configuration (`MLLMConfig`): the checkpoint's when loading a llava directory,
        else the preset's `config`. (The plan is `arch`, resolved by `plan`.)"""
        if self.pretrained:
            config = MLLMConfig.from_hf(read_config(self.pretrained, self.vision_tower), read_preprocessor(self.pretrained))
        else:
            config = MLLMConfig.from_dict(self.config)
        return replace(config, **self.preprocessing) if self.preprocessing else config

    def plan(self, arch: dict[str, Any] | None) -> Plan:
        """The `arch` config resolved for this model's depth and heads (fails at config time); no
        `arch`: the checkpoint's own plan (dense for checkpoints without one, e.g. llava-hf's)."""
        text = self.mllm_config.hf_text_config()
        if arch is None:
            saved = read_config(self.pretrained, self.vision_tower).get("efficient_mllm", {}).get("plan") if self.pretrained else None
            return Plan.from_dict(saved) if saved else Plan.dense(text.num_hidden_layers)
        plan = resolve_arch(arch, text.num_hidden_layers, text.num_attention_heads, self.mllm_config.family,
                            getattr(text, "layer_types", None))
        check_plan(plan, self.mllm_config)  # what the model refuses, refused before any data work
        return plan

    def check_task_tokenizer(self) -> None:
        """Fail before any data work when the model trains a tokenizer on the task (no `pretrained`,
        `tokenizer` or `llm_pretrained`) but its config names other ids for the image token or the
        tokens around an image than that tokenizer gives them: a shape made for real weights (a 7B preset)."""
        if self.tokenizer or self.pretrained or self.llm_pretrained:
            return
        config = self.mllm_config
        family = config.model_family
        task = task_special_ids(family.image_wrap or ())
        wanted = {"<image>": config.image_token_id, **dict(zip(family.image_wrap or (), family.image_wrap_ids(config) or ()))}
        wrong = {token: i for token, i in wanted.items() if task[token] != i}
        if wrong:
            named = ", ".join(f"{t} = {i}" for t, i in wrong.items())
            theirs = ", ".join(f"{t} = {task[t]}" for t in wrong)
            raise ConfigError(
                f"model={self.name} names {named} (model.config), but without model.pretrained, model.tokenizer or "
                f"model.llm_pretrained the job trains a tokenizer on the task, which has {theirs}: this preset is a shape "
                "for real weights. Point model.pretrained at a checkpoint directory of it (or model.tokenizer at its "
                "tokenizer), or train a tiny preset of its family (conf/model/tiny*.yaml) on the synthetic task")

    def check_weights(self) -> None:
        """Fail before any data work when `pretrained`'s weights do not fit the model its config.json
        describes: safetensors headers against that model built on the meta device (no memory, no
        tensor read). MLLM.from_pretrained checks the same when it loads."""
        if not self.pretrained:
            return
        hf = read_config(self.pretrained, self.vision_tower)
        try:
            family_for_model_type(hf.get("model_type"))
        except ConfigError as e:
            raise ConfigError(f"model.pretrained: {self.pretrained}/{e}") from None
        shapes = read_shapes(self.pretrained, self.vision_tower)
        if shapes is None:  # torch .bin weights: shapes are only known after loading them
            return
        saved_plan = hf.get("efficient_mllm", {}).get("plan")
        with torch.device("meta"):
            model = MLLM.from_config(self.mllm_config, Plan.from_dict(saved_plan) if saved_plan else None, init=False)
        message = mismatch_message(f"model.pretrained={self.pretrained}", *mismatches(model, shapes))
        if message:
            raise ConfigError(message)

    def build(self, plan: Plan | None = None) -> MLLM:
        dtype = DTYPES[self.dtype]
        if self.pretrained:
            model = MLLM.from_pretrained(self.pretrained, dtype=dtype, vision_tower=self.vision_tower)
            model.config = self.mllm_config  # the checkpoint's, with the run's resolution bounds
        elif self.vision_pretrained or self.llm_pretrained:
            model = MLLM.from_components(self.mllm_config, self.vision_pretrained, self.llm_pretrained, dtype=dtype)
        else:
            model = MLLM.from_config(self.mllm_config, dtype=dtype)
        if self.vision_position_init == "sincos2d" and not (self.pretrained or self.vision_pretrained):
            init_sincos_positions(model.vision_tower, self.mllm_config.grid_size)
        if plan is not None:
            model.set_plan(plan)
        model.gradient_checkpointing = self.gradient_checkpointing
        model.set_attention(self.attention)
        if self.compile:
            compile_decoder_layers(model)
        return model

    def load_tokenizer(self, texts: Callable[[], list[str]], cache_root: str | Path, videos: bool = False):
        """The configured / checkpoint tokenizer, or a BPE trained on the data (cached by content);
        `videos`: the data holds videos, so the tokenizer needs the family's video token."""
        source = self.tokenizer or self.pretrained or self.llm_pretrained
        family = self.mllm_config.model_family
        wrap = family.image_wrap or ()  # InternVL's <img> / </img>
        if videos:
            if family.video_token is None:
                raise ConfigError(f"the data holds videos, but the {family.name} family takes none (Qwen2-VL / Qwen2.5-VL do)")
            wrap = (*wrap, family.video_token)
        if source:
            tok = load_pretrained_tokenizer(source, wrap, self.mllm_config.image_token_id)
        else:
            template = TEMPLATES[self.chat_template]
            system = template.default_system if self.system_prompt is None else self.system_prompt
            tok = task_tokenizer(texts, template, system, self.tokenizer_vocab_size, cache_root, wrap)
        check_tokenizer(tok, self.mllm_config)
        return tok


def check_tokenizer(tok, config: MLLMConfig) -> None:
    """Fail before training when tokenizer and model disagree on ids or vocabulary size."""
    vocab = config.hf_text_config().vocab_size
    try:
        image_placeholder(tok, config.image_token_id)  # <image>, or the checkpoint's own image token (Qwen's <|image_pad|>)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if len(tok) > vocab:
        raise ConfigError(f"tokenizer has {len(tok)} tokens but the model's vocab_size is {vocab}; raise model.config.text.vocab_size")
    for name, token_id in config.token_ids.items():  # e.g. Qwen's vision_start: written by the data path, never by text
        if token_id < len(tok) and tok.convert_ids_to_tokens(token_id) not in tok.all_special_tokens:
            raise ConfigError(f"model.config.token_ids.{name}={token_id} is the tokenizer's text token "
                              f"{tok.convert_ids_to_tokens(token_id)!r}; pick an id the tokenizer does not use "
                              f"(>= {len(tok)}) or its special token")
    family = config.model_family
    video = family.video_token
    if video is not None and video in tok.get_vocab() and tok.convert_tokens_to_ids(video) != config.token_ids.get("video_token_id"):
        raise ConfigError(f"the tokenizer maps {video} to {tok.convert_tokens_to_ids(video)} but the model's config says "
                          f"{config.token_ids.get('video_token_id')} (model.config.token_ids.video_token_id); set it to the tokenizer's id")
    fixed = family.image_wrap_ids(config)  # Qwen's config fixes the ids of the tokens around each image
    if fixed is not None and wrap_ids(tok, family.image_wrap) != fixed:
        raise ConfigError(f"the tokenizer maps {' / '.join(family.image_wrap)} to {wrap_ids(tok, family.image_wrap)} but the model's "
                          f"config says {fixed} (model.config.token_ids); set them to the tokenizer's ids")
