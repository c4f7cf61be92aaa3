"""Multimodal LLM: vision tower -> projector -> plan-aware decoder over HF LLM modules."""

from . import families  # noqa: F401  (registers the model families before any config is built)
from .config import ConfigError, MLLMConfig
from .mllm import MLLM, ImageTokenMismatch, MLLMOutput

__all__ = ["MLLM", "MLLMConfig", "MLLMOutput", "ConfigError", "ImageTokenMismatch"]
