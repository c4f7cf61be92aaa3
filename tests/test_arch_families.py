"""Every arch preset (conf/arch/*.yaml) builds and runs on every model family: Llama and Qwen2
decoders, CLIP and SigLIP towers. Gated cross-attention on Qwen2 also equals the masked reference."""

from pathlib import Path

import pytest
import torch
import yaml

from models import MLLM
from models.methods import resolve_arch
from tests.helpers import image_batch, tiny_config
from tests.reference import reference_logits

CONF = Path(__file__).resolve().parents[1] / "conf" / "arch"
PRESETS = sorted(p.stem for p in CONF.glob("*.yaml"))
FAMILIES = [(vision, text) for vision in ("clip", "siglip") for text in ("llama", "qwen2")]


def preset(name: str) -> dict:
    arch = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    if name == "file":  # a pointer to a plan file: point it at another preset
        arch["path"] = str(CONF / "xattn.yaml")
    return arch


def planned_model(name: str, vision: str, text: str) -> MLLM:
    config = tiny_config(vision=vision, text=text, text_layers=4, image_size=32)
    t = config.hf_text_config()
    plan = resolve_arch(preset(name), t.num_hidden_layers, t.num_attention_heads)
    torch.manual_seed(0)
    model = MLLM(config, plan).eval()
    for block in model.xattn.values():  # open the zero-initialised gates: the blocks then change the output
        torch.nn.init.normal_(block.attn_gate, std=1.0)
        torch.nn.init.normal_(block.mlp_gate, std=1.0)
    return model


@pytest.mark.parametrize("vision, text", FAMILIES, ids=lambda x: x)
@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_runs_on_every_family(name, vision, text):
    if name == "cls_knee" and vision == "siglip":
        with pytest.raises(ValueError, match="prunes by CLS similarity, but the siglip tower has no CLS token"):
            planned_model(name, vision, text)
        return
    model = planned_model(name, vision, text)
    assert model.language_model.config.model_type == text
    input_ids, mask, pixels = image_batch(model.config, batch=2, pad_left=[0, 2])
    with torch.no_grad():
        logits = model(input_ids, mask, pixels, logits="last").logits
    assert logits.shape == (2, model.text_config.vocab_size) and torch.isfinite(logits).all()


def test_xattn_on_qwen2_uses_qwen2_mlp_and_matches_the_masked_reference():
    model = planned_model("xattn", "clip", "qwen2")
    assert model.xattn and all(type(b.mlp).__name__ == "Qwen2MLP" for b in model.xattn.values())
    input_ids, mask, pixels = image_batch(model.config, batch=2, pad_left=[0, 3], suffix=5)
    with torch.no_grad():
        got = model(input_ids, mask, pixels, logits="all").logits
        blind = model(input_ids, mask, torch.zeros_like(pixels), logits="all").logits
    want = reference_logits(model, input_ids, mask, pixels)
    text = mask.bool() & (input_ids != model.config.image_token_id)
    assert (got - want)[text].abs().max().item() <= 1e-5
    assert not torch.allclose(got[text], blind[text])  # the text reads the image through the blocks
