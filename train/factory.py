"""From the `model` config group to a model and its tokenizer.

A model preset either builds from `config` (random init), loads a llava-format directory
(`pretrained`), or combines separate vision / LLM directories (`vision_pretrained`,
`llm_pretrained`) with a new projector.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from data.chat import TEMPLATES
from data.tokenizer import load_or_train, load_pretrained_tokenizer, template_corpus
from models import MLLM, MLLMConfig
from models.checkpoint import build, load_components, load_pretrained
from models.compile import compile_decoder_layers
from models.vision import init_sincos_positions
from models.methods import resolve_arch
from models.plan import Plan
from models.config import ConfigError, check_keys

log = logging.getLogger(__name__)
DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSpec:
    name: str
    config: dict[str, Any]
    pretrained: str | None = None
    vision_pretrained: str | None = None
    llm_pretrained: str | None = None
    tokenizer: str | None = None
    tokenizer_vocab_size: int = 1024
    chat_template: str = "vicuna"
    system_prompt: str | None = None
    dtype: str | None = None
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the decoder layers (models/compile.py)
    vision_position_init: str = "random"  # random | sincos2d (a tower built from config only)
    _mllm_config: MLLMConfig | None = field(default=None, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        check_keys(d, {k for k in cls.__dataclass_fields__ if not k.startswith("_")}, "model")
        spec = cls(**d)
        if spec.dtype not in DTYPES:
            raise ConfigError(f"model.dtype must be one of {list(DTYPES)}, got {spec.dtype!r}")
        if spec.chat_template not in TEMPLATES:
            raise ConfigError(f"model.chat_template must be one of {sorted(TEMPLATES)}, got {spec.chat_template!r}")
        if spec.vision_position_init not in ("random", "sincos2d"):
            raise ConfigError(f"model.vision_position_init must be 'random' or 'sincos2d', got {spec.vision_position_init!r}")
        if spec.pretrained and (spec.vision_pretrained or spec.llm_pretrained):
            raise ConfigError("set either model.pretrained (a llava directory) or model.vision_pretrained/llm_pretrained, not both")
        return spec

    @property
    def mllm_config(self) -> MLLMConfig:
        """The architecture: the checkpoint's when loading a llava directory, else the preset's."""
        if self._mllm_config is None:
            if self.pretrained:
                path = Path(self.pretrained).expanduser() / "config.json"
                if not path.is_file():
                    raise FileNotFoundError(f"model.pretrained={self.pretrained!r}: no config.json there (is it a checkpoint directory?)")
                self._mllm_config = MLLMConfig.from_hf(json.loads(path.read_text()))
            else:
                self._mllm_config = MLLMConfig.from_dict(self.config)
        return self._mllm_config

    def plan(self, arch: dict[str, Any]) -> Plan:
        """The `arch` config resolved for this model's depth and heads (fails at config time)."""
        text = self.mllm_config.hf_text_config()
        return resolve_arch(arch, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads)

    def build(self, plan: Plan | None = None) -> MLLM:
        dtype = DTYPES[self.dtype]
        if self.pretrained:
            model = load_pretrained(self.pretrained, dtype=dtype)
        elif self.vision_pretrained or self.llm_pretrained:
            model = load_components(self.mllm_config, self.vision_pretrained, self.llm_pretrained, dtype=dtype)
        else:
            model = build(self.mllm_config, dtype=dtype)
        if self.vision_position_init == "sincos2d" and not (self.pretrained or self.vision_pretrained):
            init_sincos_positions(model.vision_tower, self.mllm_config.grid_size)
        if plan is not None:
            model.set_plan(plan)
        model.gradient_checkpointing = self.gradient_checkpointing
        if self.compile:
            compile_decoder_layers(model)
        return model

    def load_tokenizer(self, texts: Callable[[], list[str]], cache_root: str | Path):
        """The configured / checkpoint tokenizer, or a BPE trained on the data (cached by content)."""
        source = self.tokenizer or self.pretrained or self.llm_pretrained
        if source:
            tok = load_pretrained_tokenizer(source)
        else:
            template = TEMPLATES[self.chat_template]
            system = template.default_system if self.system_prompt is None else self.system_prompt

            def corpus() -> list[str]:
                return template_corpus(template, system, texts())

            digest = hashlib.sha256(json.dumps([corpus(), self.tokenizer_vocab_size]).encode()).hexdigest()[:12]
            tok = load_or_train(Path(cache_root) / f"tokenizer-{digest}", corpus, self.tokenizer_vocab_size)
        check_tokenizer(tok, self.mllm_config)
        return tok


def check_tokenizer(tok, config: MLLMConfig) -> None:
    """Fail before training when tokenizer and model disagree on ids or vocabulary size."""
    vocab = config.hf_text_config().vocab_size
    image_id = tok.convert_tokens_to_ids("<image>")
    if image_id != config.image_token_id:
        raise ConfigError(
            f"tokenizer maps <image> to {image_id} but model.config.image_token_id={config.image_token_id}; "
            "set model.config.image_token_id (or use the checkpoint's tokenizer)"
        )
    if len(tok) > vocab:
        raise ConfigError(f"tokenizer has {len(tok)} tokens but the model's vocab_size is {vocab}; raise model.config.text.vocab_size")
