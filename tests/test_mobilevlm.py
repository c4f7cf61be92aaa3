"""MobileVLM V2 (models/families/mobilevlm.py): LDPv2 equals an independent re-implementation
(tests/mobilevlm_reference.py) on even and uneven pooling windows; the whole model, saved in the original
LLaVA layout and read back by transformers' CLIP and Llama with that reference projector, gives the same
logits under left padding and the same greedy generation; the directory holds MobileVLM's weight names; the
family refuses what LDPv2 cannot pool."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from models import MLLM
from models.config import ConfigError
from models.generation import greedy_generate
from models.original_layout import to_original
from models.projector import LDPv2
from tests.helpers import image_batch, tiny_config, tiny_mobilevlm_config
from tests.mobilevlm_reference import ReferenceMobileVLM, reference_ldpv2
from train.tools.convert_checkpoint import convert_checkpoint


@pytest.mark.parametrize("grid", [24, 16, 12], ids=["24to12", "16to12-uneven", "12to12"])
def test_ldpv2_equals_the_reference(grid):
    torch.manual_seed(grid)
    projector = LDPv2(24, 40)
    torch.nn.init.normal_(projector.peg.weight)  # every tap of the 3 x 3 filters matters
    features = torch.randn(3, grid * grid, 24)
    weights = {to_original(f"multi_modal_projector.{k}", "ldpnetv2").removeprefix("model.mm_projector."): v
               for k, v in projector.state_dict().items()}
    with torch.no_grad():
        got = projector(features)
    assert got.shape == (3, 144, 40)
    assert (got - reference_ldpv2(features, weights)).abs().max().item() <= 1e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    ours = MLLM.from_config(tiny_mobilevlm_config()).eval()
    torch.nn.init.normal_(ours.multi_modal_projector.peg.weight, std=0.5)
    path = ours.save_pretrained(tmp_path_factory.mktemp("mobilevlm") / "export")
    return ours, path, ReferenceMobileVLM(path)


def test_the_directory_is_mobilevlms_original_layout(saved):
    ours, path, _ = saved
    config = json.loads((path / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["mm_projector_type"]) == ("mobilevlm", ["MobileLlamaForCausalLM"], "ldpnetv2")
    assert config["vision_tower_type"] == "clip" and config["mm_vision_select_feature"] == "patch"
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert {k: v for k, v in shapes.items() if k.startswith("model.mm_projector.")} == {
        "model.mm_projector.mlp.mlp.0.weight": (64, 32), "model.mm_projector.mlp.mlp.0.bias": (64,),
        "model.mm_projector.mlp.mlp.2.weight": (64, 64), "model.mm_projector.mlp.mlp.2.bias": (64,),
        "model.mm_projector.peg.peg.0.weight": (64, 1, 3, 3), "model.mm_projector.peg.peg.0.bias": (64,)}
    with pytest.raises(ConfigError, match="only one"):
        convert_checkpoint(path, path.parent / "as-llava-hf")


@pytest.mark.parametrize("pad_left", [None, [0, 3, 5]], ids=["no-padding", "left-padding"])
def test_logits_equal_the_reference(saved, pad_left):
    ours, path, reference = saved
    loaded = MLLM.from_pretrained(path).eval()
    ids, mask, pixels = image_batch(loaded.config, batch=3, pad_left=pad_left)
    assert ids[0].tolist().count(loaded.config.image_token_id) == 144
    with torch.no_grad():
        got = loaded(ids, mask, pixels).logits
        assert torch.equal(got[mask.bool()], ours(ids, mask, pixels).logits[mask.bool()])
    want = reference.logits(ids, mask, pixels)
    assert (got - want)[mask.bool()].abs().max().item() <= 1e-5


def test_greedy_generation_equals_the_reference(saved):
    _, path, reference = saved
    loaded = MLLM.from_pretrained(path).eval()
    ids, mask, pixels = image_batch(loaded.config, batch=3, pad_left=[0, 2, 4], seed=1)
    got = greedy_generate(loaded, ids, mask, pixels, max_new_tokens=10, eos_token_id=[127], pad_token_id=0)
    want = reference.generate(ids, mask, pixels, max_new_tokens=10, eos_token_id=127)
    assert torch.equal(got, want[:, : got.shape[1]])


@pytest.mark.parametrize("overrides, message", [
    (dict(family="mobilevlm"), "ldpnetv2"),                                   # LLaVA's MLP projector
    (dict(family="mobilevlm", projector="ldpnetv2", image_size=32), "8 x 8"),  # an 8 x 8 grid cannot pool to 12 x 12
    (dict(family="mobilevlm", projector="ldpnetv2", image_size=64, vision_feature_select_strategy="full"), "CLS"),
    (dict(projector="ldpnetv2", image_size=64), "family=mobilevlm"),         # LDPv2 in the llava family
])
def test_what_ldpv2_cannot_pool_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**overrides)


@pytest.mark.parametrize("preset, billions", [("mobilevlm_v2_3b", 3.01), ("mobilevlm_v2_1_7b", 1.67)])
def test_the_released_shapes(preset, billions):
    """CLIP ViT-L/14-336 (0.30B) + LDPv2 + MobileLLaMA 2.7B / 1.4B: the releases' 3B / 1.7B (meta-device build)."""
    from omegaconf import OmegaConf

    from models import MLLMConfig
    from tests.test_configs import compose_train

    config = MLLMConfig.from_dict(OmegaConf.to_container(compose_train([f"model={preset}"]).model.config, resolve=True))
    with torch.device("meta"):
        total = sum(p.numel() for p in MLLM.from_config(config).parameters())
    assert config.num_image_tokens == 144 and abs(total / 1e9 - billions) < 0.01, total


def test_visipruners_mobilevlm_row():
    """VisiPruner's MobileVLM-V2-3B, 0.37 -> 0.25 TFLOPs: its convention (MACs of the visual tokens' rows in
    the LLM, methods.md §0) gives 0.369 for 144 tokens; 0.25 is the dense cost up to a filtering layer at 22 of
    32 (0.254; the paper finds that layer per sample), our preset's layer 9 (LLaVA-1.5-7B's) gives 0.107."""
    from tests.test_vision_flops import flops_cli

    convention = ["model=mobilevlm_v2_3b", "arch=visipruner", "flops.convention=mac", "flops.scope=visual"]
    preset = flops_cli(*convention)
    assert preset["n_visual"] == 144 and preset["dense_tflops"] == pytest.approx(0.37, abs=0.005)
    assert preset["plan_tflops"] == pytest.approx(0.107, abs=0.001)
    assert flops_cli(*convention, "arch.methods.visipruner.middle=22")["plan_tflops"] == pytest.approx(0.25, abs=0.005)
    assert preset["projector_tflops"] == pytest.approx(576 * (1024 * 2560 + 2560**2) / 1e12 + 144 * 2560 * 9 / 1e12, abs=1e-6)
