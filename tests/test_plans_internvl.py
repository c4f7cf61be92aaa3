"""Every plan preset on InternVL equals the slow masked reference (fp32, <= 1e-5) in prefill and
decode, on a batch whose rows hold 5, 3 and 1 tiles (hence different visual-token counts) with left
padding; and InternVL's semantics of each plan hold: `uniform` and `pool` work per tile (the
thumbnail is a tile of its own), `dominant` reads InternViT's CLS attention of the last layer summed
over each pixel-shuffle unit, `cls_knee` cuts per tile. transformers' inputs (flat tiles, no sizes) give
every preset the same tiles, units and thumbnail, read from the placeholders."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import InternVLVisionConfig, InternVLVisionModel

from models import MLLM
from models.streams import Place
from tests.helpers import internvl_hf_batch, internvl_images, next_batch, tiny_internvl_config
from tests.reference import reference_logits
from tests.test_plans import VARIANTS, ids, plan_model
from tests.tiled_plans import assert_decode_matches_reference, assert_prefill_matches_reference, visual_keys


def internvl_plan_model(name: str, knobs: dict, layers: int = 8, seed: int = 0) -> MLLM:
    """An 8-layer tiny InternVL (InternViT tiles of 4 x 4 tokens, Qwen2) under the preset, gates opened."""
    return plan_model(name, knobs, seed=seed, config=tiny_internvl_config(text_layers=layers))


def batch(config, **kw):
    return next_batch(config, images=internvl_images, **kw)


@pytest.mark.parametrize("variant", VARIANTS, ids=ids)  # every preset, dominant and cls_knee among them
def test_prefill_matches_masked_reference_on_internvl(variant):
    model = internvl_plan_model(*variant)
    assert_prefill_matches_reference(model, *batch(model.config, pad_left=[0, 2, 5]))


@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_decode_matches_masked_reference_on_internvl(variant):
    model = internvl_plan_model(*variant, seed=1)
    assert_decode_matches_reference(model, *batch(model.config, pad_left=[0, 3, 1], seed=2))


@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_transformers_inputs_without_sizes_match_masked_reference(variant):
    """Flat tiles without sizes, two images in a row and a text-only row: equal to the masked reference
    given the sizes and the padded tiles (random selections key each image on its own tiles either way)."""
    model = internvl_plan_model(*variant)
    input_ids, mask, flat, padded, sizes = internvl_hf_batch(model.config, pad_left=[0, 2, 4])
    with torch.no_grad():
        got = model(input_ids, mask, flat, logits="all").logits
    want = reference_logits(model, input_ids, mask, padded, image_sizes=sizes)
    text = mask.bool() & (input_ids != model.config.image_token_id)
    assert (got - want)[text].abs().max().item() <= 1e-5


@torch.no_grad()
def test_uniform_keeps_a_lattice_in_every_tile_and_the_thumbnail():
    model = internvl_plan_model("uniform", {"keep": 0.25})
    input_ids, mask, pixels, sizes = batch(model.config)
    kept, vis = visual_keys(model, input_ids, mask, pixels, sizes, 0)
    for b, place in enumerate(kept):
        units = vis.at(Place.UNIT)[b][vis.valid[b]]
        assert len(units.unique()) == model.family.tiles_per_image(model.config, sizes[b].tolist())
        for unit in units.unique().tolist():
            assert int((place[:, Place.UNIT] == unit).sum()) == math.ceil(0.25 * int((units == unit).sum()))


@torch.no_grad()
def test_pool_pools_each_tile():
    model = internvl_plan_model("pool", {"kernel": 2})
    dense = MLLM(model.config).eval()
    dense.load_state_dict(model.state_dict())
    _, _, pixels, sizes = batch(model.config)
    pooled, full = model.encode_images(pixels, sizes), dense.encode_images(pixels, sizes)
    for image, size in enumerate(sizes.tolist()):
        mine = pooled.image_of_token[pooled.keep] == image
        assert int(mine.sum()) == model.family.tiles_per_image(model.config, size) * 4  # 4 x 4 tokens -> 2 x 2 per tile
    thumbnail = full.h[4 * 16 : 5 * 16].view(4, 4, -1)  # image 0: 4 tiles, then the thumbnail
    assert torch.allclose(pooled.h[4 * 4], thumbnail[:2, :2].mean((0, 1)), atol=1e-6)


@torch.no_grad()
def test_dominance_is_internvits_cls_attention_summed_over_each_pixel_shuffle_unit():
    model = internvl_plan_model("dominant", {})
    _, _, pixels, sizes = batch(model.config)
    tokens = model.family.encode(model, pixels, sizes, "dominance")
    vision = InternVLVisionConfig(**model.config.hf_vision_config().to_dict())
    vision._attn_implementation = "eager"  # attention probabilities are returned by the eager path only
    tower = InternVLVisionModel(vision).eval()
    tower.load_state_dict(model.vision_tower.state_dict())
    n_tiles = [model.family.tiles_per_image(model.config, s) for s in sizes.tolist()]
    flat = torch.cat([p[:n] for p, n in zip(pixels, n_tiles)])
    attention = tower(flat, output_attentions=True).attentions[-1]  # [tiles, heads, 1 + 64, 1 + 64]
    g = model.config.grid_size
    from_cls = attention[:, :, 0, 1:].mean(1).view(len(flat), g // 2, 2, g // 2, 2).sum((2, 4))  # 2 x 2 blocks
    assert torch.allclose(tokens.scores["dominance"], from_cls.reshape(-1), atol=1e-6)


@torch.no_grad()
def test_cls_knee_cuts_each_tile_on_its_own_curve():
    model = internvl_plan_model("cls_knee", {})
    _, _, pixels, sizes = batch(model.config)
    tokens = model.encode_images(pixels, sizes)
    keep_units = tokens.place[tokens.keep, Place.UNIT] + 100 * tokens.image_of_token[tokens.keep]
    all_units = tokens.place[:, Place.UNIT] + 100 * tokens.image_of_token
    assert set(keep_units.tolist()) == set(all_units.tolist())  # every tile keeps its own knee's tokens
    assert 0 < int(tokens.keep.sum()) < len(tokens.keep)
