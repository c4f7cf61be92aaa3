"""A model for the synthetic task's tokenizer and synthetic questions, shared by the lmms-eval bridge tests."""

from __future__ import annotations

from PIL import Image

from data.synthetic import SyntheticConfig, make_sample, render
from models import MLLMConfig


def task_model_config(layers: int = 4) -> MLLMConfig:
    """A model for the synthetic task's 1024-token tokenizer: 64 px images, 16 visual tokens."""
    return MLLMConfig(
        vision=dict(model_type="siglip_vision_model", hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=2, image_size=64, patch_size=16),
        text=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_feature_select_strategy="full", image_token_id=3, image_mean=(0.5,) * 3, image_std=(0.5,) * 3,
    )


def synthetic_questions(n: int) -> list[tuple[str, str, Image.Image]]:
    """(question, answer, image) of the first `n` synthetic validation samples."""
    cfg = SyntheticConfig(seed=0, n_val=n)
    out = []
    for i in range(n):
        scene, record = make_sample(cfg, "val", i)
        question = record["conversations"][0]["value"].removeprefix("<image>\n")
        out.append((question, record["conversations"][1]["value"], render(scene)))
    return out
