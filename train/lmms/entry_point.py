"""The `lmms_eval.models` entry point (pyproject.toml): lmms-eval 0.7's registry calls `manifest()`
when it starts, so `--model efficient_mllm` resolves to train.lmms.model.EfficientMLLM."""

from __future__ import annotations


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="efficient_mllm", simple_class_path="train.lmms.model.EfficientMLLM")
