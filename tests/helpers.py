"""Tiny models and batches built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import torch


def tiny_config(vision: str = "clip", text: str = "llama", text_layers: int = 3, image_size: int = 16, **overrides):
    """A few-thousand-parameter MLLM config; CLIP keeps a CLS token (dropped by 'default')."""
    from models import MLLMConfig

    vision_cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=image_size, patch_size=4)
    if vision == "clip":
        vision_cfg["model_type"] = "clip_vision_model"
    else:
        vision_cfg["model_type"] = "siglip_vision_model"
    text_cfg = dict(
        model_type=text,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    args = dict(
        vision=vision_cfg,
        text=text_cfg,
        image_token_id=3,
        vision_feature_select_strategy="default" if vision == "clip" else "full",
    )
    args.update(overrides)
    return MLLMConfig(**args)


def tiny_model(seed: int = 0, **kw):
    from models import MLLM

    torch.manual_seed(seed)
    return MLLM.from_config(tiny_config(**kw)).eval()


def image_batch(config, batch: int, prefix: int = 3, suffix: int = 6, pad_left: list[int] | None = None, seed: int = 0):
    """Random ids with one expanded image per row; `pad_left[i]` pad tokens at the start of row i."""
    g = torch.Generator().manual_seed(seed)
    n_v = config.num_image_tokens
    prefix += max(pad_left or [0])  # padding never covers the image
    length = prefix + n_v + suffix
    ids = torch.randint(4, config.hf_text_config().vocab_size, (batch, length), generator=g)
    ids[:, prefix : prefix + n_v] = config.image_token_id
    mask = torch.ones(batch, length, dtype=torch.long)
    for i, n in enumerate(pad_left or []):
        ids[i, :n] = 0
        mask[i, :n] = 0
    size = config.hf_vision_config().image_size
    pixels = torch.randn(batch, 3, size, size, generator=g)
    return ids, mask, pixels
