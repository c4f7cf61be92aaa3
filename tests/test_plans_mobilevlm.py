"""Every plan preset on MobileVLM V2 equals the slow masked reference (fp32, <= 1e-5) in prefill and
decode, with left padding; the 144 LDPv2 tokens sit on a 12 x 12 grid, so `pool` pools that grid,
`uniform` keeps a lattice of it, and a tower score (dominance, CLS similarity) is the mean over the
patches each token's pooling window covers."""

from __future__ import annotations

import pytest
import torch

from models import MLLM
from models.streams import Place
from tests.helpers import image_batch, tiny_mobilevlm_config
from tests.test_plans import VARIANTS, ids, plan_model
from tests.tiled_plans import assert_decode_matches_reference, assert_prefill_matches_reference
from models.vision import tower_features


def mobilevlm_plan_model(name: str, knobs: dict, layers: int = 8, seed: int = 0) -> MLLM:
    return plan_model(name, knobs, seed=seed, config=tiny_mobilevlm_config(text_layers=layers))


@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_prefill_matches_masked_reference_on_mobilevlm(variant):
    model = mobilevlm_plan_model(*variant)
    assert_prefill_matches_reference(model, *image_batch(model.config, batch=3, pad_left=[0, 2, 5], suffix=7), None)


@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_decode_matches_masked_reference_on_mobilevlm(variant):
    model = mobilevlm_plan_model(*variant, seed=1)
    assert_decode_matches_reference(model, *image_batch(model.config, batch=2, pad_left=[0, 3], suffix=5, seed=2), None)


@torch.no_grad()
def test_pool_and_uniform_work_on_the_12_by_12_grid():
    pool = mobilevlm_plan_model("pool", {"kernel": 2})
    _, _, pixels = image_batch(pool.config, batch=2)
    pooled = pool.encode_images(pixels)
    dense = MLLM(pool.config).eval()
    dense.load_state_dict(pool.state_dict())
    full = dense.encode_images(pixels)
    assert int(pooled.keep.sum()) == 2 * 36  # 6 x 6 windows per image
    grid = full.h[:144].view(12, 12, -1)
    assert torch.allclose(pooled.h[1], grid[:2, 2:4].mean((0, 1)), atol=1e-6)  # the second window of the first row
    uniform = mobilevlm_plan_model("uniform", {"K": 0, "keep": 0.25})
    layer = uniform.plan.layers[0].select
    assert layer is not None and layer.budget(144) == 36


@torch.no_grad()
@pytest.mark.parametrize("score", ["dominance", "cls_similarity"])
def test_tower_scores_are_pooled_with_the_tokens(score):
    model = MLLM.from_config(tiny_mobilevlm_config()).eval()
    _, _, pixels = image_batch(model.config, batch=2)
    per_patch = tower_features(model.vision_tower, pixels, model.config, score)[1]  # [2, 256] on the 16 x 16 grid
    got = model.family.encode(model, pixels, None, score).scores[score].view(2, 12, 12)
    patches = per_patch.view(2, 16, 16)
    assert torch.allclose(got[:, 0, 0], patches[:, 0:2, 0:2].mean((1, 2)))  # windows [0, 2) ...
    assert torch.allclose(got[:, 1, 2], patches[:, 1:3, 2:4].mean((1, 2)))  # ... [1, 3), [2, 4): 16 -> 12 overlaps
    assert torch.equal(model.family.encode(model, pixels, None, score).place[:, Place.ROW].view(2, 144)[0], torch.arange(144) // 12)
