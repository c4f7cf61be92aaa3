"""Every plan preset on LLaVA-NeXT equals the slow masked reference (fp32, <= 1e-5) in prefill and
decode, on a batch whose rows hold different tilings (a wide, a tall and a 2 x 2-tile image, hence
different visual-token counts) with left padding; and the NeXT semantics of each plan hold:
selections budget per image and keep the row newlines, `uniform` and `pool` work per tile, VTW
withdraws the newlines too."""

from __future__ import annotations

import math

import pytest
import torch

from models import MLLM
from models.streams import Place
from tests.helpers import next_batch, tiny_next_config
from tests.test_plans import VARIANTS, ids, plan_model
from tests.tiled_plans import assert_decode_matches_reference, assert_prefill_matches_reference, visual_keys


def next_plan_model(name: str, knobs: dict, layers: int = 8, seed: int = 0) -> MLLM:
    """An 8-layer tiny LLaVA-NeXT (CLIP tiles of 4 x 4 tokens, Llama) under the preset, gates opened."""
    return plan_model(name, knobs, seed=seed, config=tiny_next_config(text_layers=layers))


@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_prefill_matches_masked_reference_on_next(variant):
    model = next_plan_model(*variant)
    assert_prefill_matches_reference(model, *next_batch(model.config, pad_left=[0, 2, 5]))


@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_decode_matches_masked_reference_on_next(variant):
    model = next_plan_model(*variant, seed=1)
    assert_decode_matches_reference(model, *next_batch(model.config, pad_left=[0, 3, 1], seed=2))


@torch.no_grad()
@pytest.mark.parametrize("name, knobs", [("fastv", {}), ("random", {}), ("pdrop", {})])
def test_selections_budget_per_image_and_keep_every_newline(name, knobs):
    model = next_plan_model(name, knobs)
    input_ids, mask, pixels, sizes = next_batch(model.config)
    layer = max(i for i, p in enumerate(model.plan.layers) if p.select is not None)
    kept, vis = visual_keys(model, input_ids, mask, pixels, sizes, layer)
    for b, place in enumerate(kept):
        n_grid = int((vis.valid[b] & ~vis.extra[b]).sum())
        n_newline = int((vis.valid[b] & vis.extra[b]).sum())
        budget = n_grid
        for p in model.plan.layers[: layer + 1]:
            if p.select is not None:
                budget = p.select.budget(budget)
        assert int(place[:, Place.EXTRA].sum()) == n_newline > 0  # every newline stays
        assert int((place[:, Place.EXTRA] == 0).sum()) == budget


@torch.no_grad()
def test_random_keys_each_image_on_its_tiles_flat_or_padded():
    """transformers' flat tiles [sum tiles, 3, S, S] key each image as the padded layout does (not tile by tile)."""
    model = next_plan_model("random", {"K": 2, "seed": 7})
    input_ids, mask, pixels, sizes = next_batch(model.config)
    n_tiles = [model.family.tiles_per_image(model.config, s) for s in sizes.tolist()]
    flat = torch.cat([p[:n] for p, n in zip(pixels, n_tiles)])
    text = mask.bool() & (input_ids != model.config.image_token_id)
    got = model(input_ids, mask, flat, image_sizes=sizes).logits
    assert torch.equal(got[text], model(input_ids, mask, pixels, image_sizes=sizes).logits[text])


@torch.no_grad()
def test_uniform_keeps_a_lattice_in_every_tile():
    model = next_plan_model("uniform", {"keep": 0.25})
    input_ids, mask, pixels, sizes = next_batch(model.config)
    kept, vis = visual_keys(model, input_ids, mask, pixels, sizes, 0)
    for b, place in enumerate(kept):
        grid = place[place[:, Place.EXTRA] == 0]
        for unit in vis.at(Place.UNIT)[b][vis.valid[b] & ~vis.extra[b]].unique().tolist():
            n_unit = int((vis.at(Place.UNIT)[b][vis.valid[b] & ~vis.extra[b]] == unit).sum())
            assert int((grid[:, Place.UNIT] == unit).sum()) == math.ceil(0.25 * n_unit)  # a budget per tile


@torch.no_grad()
def test_pool_pools_each_tile_and_keeps_the_newlines():
    model = next_plan_model("pool", {"kernel": 2})
    dense = MLLM(model.config).eval()
    dense.load_state_dict(model.state_dict())
    _, _, pixels, sizes = next_batch(model.config)
    pooled, full = model.encode_images(pixels, sizes), dense.encode_images(pixels, sizes)
    kept = pooled.place[pooled.keep]
    for image in range(len(sizes)):
        mine = pooled.image_of_token[pooled.keep] == image
        theirs = full.image_of_token == image
        units = full.place[theirs & (full.place[:, Place.EXTRA] == 0), Place.UNIT]
        windows = 0
        for unit in units.unique().tolist():
            rows = full.place[theirs & (full.place[:, Place.UNIT] == unit) & (full.place[:, Place.EXTRA] == 0), Place.ROW]
            cols = full.place[theirs & (full.place[:, Place.UNIT] == unit) & (full.place[:, Place.EXTRA] == 0), Place.COL]
            windows += len({(int(r) // 2, int(c) // 2) for r, c in zip(rows, cols)})
        assert int((kept[mine][:, Place.EXTRA] == 0).sum()) == windows
        assert int(kept[mine][:, Place.EXTRA].sum()) == int(full.place[theirs, Place.EXTRA].sum())  # newlines kept
    base = full.h[: 16].view(4, 4, -1)  # image 0's base tile: its first pooled token is the top-left 2 x 2 mean
    assert torch.allclose(pooled.h[0], base[:2, :2].mean((0, 1)), atol=1e-6)


@torch.no_grad()
def test_vtw_withdraws_the_newlines_too():
    model = next_plan_model("vtw", {})
    input_ids, mask, pixels, sizes = next_batch(model.config)
    out = model(input_ids, mask, pixels, logits="last", use_cache=True, image_sizes=sizes)
    k = next(i for i, p in enumerate(model.plan.layers) if p.drop_visual)
    assert all(not keys.is_visual[keys.valid].any() for keys in out.cache.keys[k:])
    assert all(keys.is_visual[keys.valid].any() for keys in out.cache.keys[:k])
