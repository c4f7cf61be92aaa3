"""Every plan preset on Qwen3-VL equals the slow masked reference (fp32, <= 1e-5) in prefill and
decode, with DeepStack's semantics (`models.streams.injected`): a token pruned, pooled or withdrawn
before an injection layer takes its injections with it (pooled tokens carry their window's mean), a
frozen token still receives them, ViCA's bypass stream receives them in its own stream. Plans that act
inside the DeepStack zone (the tiny model injects after decoder layers 0 and 1) are checked there on
purpose: FastV and random selection before layer 1, VTW withdrawing every visual token before layer 1,
ShortV-style freezing of layers 0 and 1. The MoE variant runs a few presets (its MoE FFN and q/k norms
are covered for every preset by tests/test_plans_qwen3_text.py). `dominant` reads the last tower
block's attention; presets that cannot apply are refused when set."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import qwen_batch, tiny_qwen3_vl_config
from tests.test_plans import ids, plan_model
from tests.test_plans_qwen import REFUSED, RUNNABLE as QWEN_RUNNABLE
from tests.tiled_plans import assert_decode_matches_reference, assert_prefill_matches_reference

IN_DEEPSTACK_ZONE = [
    ("fastv", {"K": 4}),  # 4 of 32 -> before layer 1 of 8: between the two injections
    ("random", {"K": 4, "keep": 0.5}),
    ("vtw", {"K": 4}),  # every visual token leaves before layer 1: injection 1 is never added
]
RUNNABLE = QWEN_RUNNABLE + IN_DEEPSTACK_ZONE  # what every M-RoPE family runs, plus the plans inside the zone
FROZEN_ZONE = {"methods": {"rules": [{"layers": [0, 1], "set": {"visual_update": "frozen"}}]}}  # ShortV-style, hand-written


def qwen3_plan_model(name: str, knobs: dict, moe: bool = False, seed: int = 0):
    return plan_model(name, knobs, seed=seed, config=tiny_qwen3_vl_config(moe=moe, text_layers=8))


def check_prefill_and_decode(model, seed: int = 0):
    input_ids, mask, pixels, grids, _ = qwen_batch(model.config, pad_left=[0, 2, 5], seed=seed)
    assert_prefill_matches_reference(model, input_ids, mask, pixels, grids)
    n = int(grids[:2].prod(-1).sum())  # the first two rows' images
    assert_decode_matches_reference(model, input_ids[:2], mask[:2], pixels[:n], grids[:2], steps=3)


@pytest.mark.parametrize("variant", RUNNABLE, ids=ids)
def test_prefill_and_decode_match_masked_reference_on_qwen3_vl(variant):
    check_prefill_and_decode(qwen3_plan_model(*variant))


@pytest.mark.parametrize("variant", [("fastv", {"K": 4}), ("vica", {}), ("pool", {})], ids=ids)
def test_prefill_and_decode_match_masked_reference_on_qwen3_vl_moe(variant):
    check_prefill_and_decode(qwen3_plan_model(*variant, moe=True), seed=1)


def test_frozen_tokens_in_the_deepstack_zone_still_receive_their_injections():
    """Layers 0 and 1 frozen for visual tokens: the tokens skip both layers' work but take both
    injections, so after layer 1 each one is its projector output plus its two DeepStack features."""
    from models.methods import resolve_arch

    config = tiny_qwen3_vl_config(text_layers=8)
    model = plan_model("dense", {}, config=config)
    model.set_plan(resolve_arch(FROZEN_ZONE, 8, 4, config.family))
    check_prefill_and_decode(model)
    input_ids, mask, pixels, grids, _ = qwen_batch(config)
    seen = []
    with torch.no_grad():
        model(input_ids, mask, pixels, logits="last", image_sizes=grids, layer_hook=lambda step: seen.append(step.vis_in) and None)
        tokens = model.encode_images(pixels, grids)
    after_two = seen[2]  # the input of layer 2: after layers 0, 1 and both injections
    assert torch.allclose(after_two.h[after_two.valid], tokens.h + tokens.inject.sum(1), atol=1e-6)


def test_cls_knee_is_refused():
    with pytest.raises(ValueError, match=REFUSED["cls_knee"]):
        qwen3_plan_model("cls_knee", {})
