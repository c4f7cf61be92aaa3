"""`MLLM.from_components` (model.vision_pretrained / model.llm_pretrained) for every family: a tower and an LLM
from the directories transformers writes (a tower's own, or a whole model's), a new projector; the
combinations a family cannot run are refused naming the part."""

from __future__ import annotations

import pytest
import torch
from transformers import (InternVLForConditionalGeneration, InternVLVisionConfig, InternVLVisionModel, LlamaConfig,
                          LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen2VLForConditionalGeneration, Qwen3Config,
                          Qwen3ForCausalLM, Qwen3VLForConditionalGeneration)
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from models import MLLM, ConfigError
from tests.helpers import tiny_config, tiny_internvl_config, tiny_qwen3_vl_config, tiny_qwen_config

LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Directories written by transformers' save_pretrained: towers (InternViT's and Qwen2-VL's own, and
    whole InternVL / Qwen2-VL / Qwen3-VL models), a Qwen2, a Qwen3 and a Llama LLM."""
    root = tmp_path_factory.mktemp("components")
    torch.manual_seed(0)
    models = {
        "internvit": InternVLVisionModel(InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                              num_attention_heads=2, image_size=32, patch_size=4)),
        "qwen_tower": Qwen2VisionTransformerPretrainedModel(Qwen2VLVisionConfig(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2,
                                                                                hidden_size=48, patch_size=4)),
        "internvl": InternVLForConditionalGeneration(tiny_internvl_config().hf_config()),
        "qwen2_vl": Qwen2VLForConditionalGeneration(tiny_qwen_config().hf_config()),
        "qwen3_vl": Qwen3VLForConditionalGeneration(tiny_qwen3_vl_config().hf_config()),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(**LLM)),
        "qwen3": Qwen3ForCausalLM(Qwen3Config(**LLM, head_dim=16)),
        "llama": LlamaForCausalLM(LlamaConfig(**LLM)),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
    return root, {name: model.eval() for name, model in models.items()}


def assert_holds(module, reference) -> None:
    """Every tensor of `module` equals the one of the same name in `reference`."""
    theirs = reference.state_dict()
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize("tower", ["internvit", "internvl"])
@pytest.mark.parametrize("llm", ["qwen2", "llama"])
def test_internvl_from_an_internvit_and_a_qwen2_or_llama_llm(dirs, tower, llm):
    root, models = dirs
    model = MLLM.from_components(tiny_internvl_config(), root / tower, root / llm)
    source = models[tower] if tower == "internvit" else models[tower].model.vision_tower
    assert_holds(model.vision_tower, source)
    assert_holds(model.language_model, models[llm].model)
    assert torch.equal(model.lm_head.weight, models[llm].lm_head.weight)
    assert model.config.text["model_type"] == llm and model.multi_modal_projector.linear_1.in_features == 4 * 32


@pytest.mark.parametrize("config, tower, llm", [(tiny_qwen_config(), "qwen_tower", "qwen2"), (tiny_qwen_config(), "qwen2_vl", "qwen2"),
                                               (tiny_qwen3_vl_config(), "qwen3_vl", "qwen3")], ids=["qwen2_vl-tower", "qwen2_vl", "qwen3_vl"])
def test_qwen_vl_from_a_qwen_tower_and_a_qwen_llm(dirs, config, tower, llm):
    """Qwen2-VL's LLM is Qwen2 with M-RoPE, Qwen3-VL's Qwen3: the LLM directory's weights, under the family's text
    type with the preset's M-RoPE settings, give that LLM's own logits on text (whose (t, h, w) are its 1-D
    positions); the tower comes without its merger (and DeepStack mergers), new here, as wide as the LLM."""
    root, models = dirs
    model = MLLM.from_components(config, root / tower, root / llm).eval()
    source = models[tower] if tower == "qwen_tower" else models[tower].model.visual
    assert_holds(model.vision_tower, source)
    assert model.config.text["model_type"] == f"{config.family}_text" and model.family.merged_width(model.config.hf_vision_config()) == 64
    ids = torch.randint(7, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, models[llm](ids).logits, atol=1e-5)


@pytest.mark.parametrize("config, tower, llm, words", [
    (tiny_qwen_config(), "qwen_tower", "llama", ["model.llm_pretrained=", "llama", "qwen2's with M-RoPE", "give a qwen2 LLM directory"]),
    (tiny_internvl_config(), "qwen_tower", "qwen2", ["model.vision_pretrained=", "qwen2_vl_vision", "internvl family", "internvl_vision"]),
    (tiny_config(), "internvit", "qwen2", ["internvl_vision", "llava family", "clip_vision_model, siglip_vision_model"]),
], ids=["qwen2_vl-llama", "internvl-qwen-tower", "llava-internvit"])
def test_combinations_a_family_cannot_run_are_refused_by_name(dirs, config, tower, llm, words):
    root, _ = dirs
    with pytest.raises(ConfigError) as e:
        MLLM.from_components(config, root / tower, root / llm)
    for word in words:
        assert word in str(e.value)
