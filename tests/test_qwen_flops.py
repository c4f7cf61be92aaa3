"""Qwen2-VL's and Qwen2.5-VL's tower and projector FLOPs (`Family.vision_flops`) equal
`FlopCounterMode` on the real tiny towers, for images of different grids (Qwen2.5-VL: windows
that do and do not divide the grid), and the released 7B models' counts at their pixel budgets."""

from __future__ import annotations

import pytest
import torch

from models import MLLM
from models.flops import measure_flops
from tests.helpers import image_patches, qwen_batch, tiny_qwen_config


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_vision_flops_equal_the_flop_counter(family):
    model = MLLM.from_config(tiny_qwen_config(family)).eval()
    _, _, pixels, grids, _ = qwen_batch(model.config)
    for one, thw in image_patches(pixels, grids):
        with torch.no_grad():
            tower, (features, *_) = measure_flops(model.family.run_tower, model.vision_tower, one, thw, False)
            projector, _ = measure_flops(model.multi_modal_projector, features)
        want = model.family.vision_flops(model.config, tuple(thw[0].tolist()))
        assert want == {"tower": tower, "projector": projector}, thw


def flops_row(*args):
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "train", "flops", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_7b_presets_give_the_parts_at_their_pixel_budgets():
    """At 1344 x 1344 with qwen-vl-utils' 16384 * 28 * 28 pixels: 2304 visual tokens, an LLM of
    33.2 TFLOPs and a Qwen2-VL tower of 25.5 (full attention over 9216 patches), Qwen2.5-VL's 13.5
    (windows; families.md §9.2's calculator gives 33.2, 25.5 and about 13.4); at the presets' own
    budget (the processor's 1280-token cap) the same image gives 1225 tokens. YOPO's Qwen2-VL-7B cut
    at 24 of 28 drops every visual token from layer 24 on."""
    big = ["flops.image_size=[1344,1344]", "model.config.max_pixels=12845056"]
    row = flops_row("model=qwen2_vl_7b", *big)
    assert row["n_visual"] == 2304 and row["pixels"] == [3136, 12845056]
    assert round(row["dense_tflops"], 1) == 33.2 and round(row["tower_tflops"], 1) == 25.5
    assert round(flops_row("model=qwen2_5_vl_7b", *big)["tower_tflops"], 1) == 13.5
    assert flops_row("model=qwen2_vl_7b", "flops.image_size=[1344,1344]")["n_visual"] == 1225

    import yaml

    from models.methods import resolve_arch

    arch = yaml.safe_load(open("conf/arch/yopo.yaml"))
    arch["methods"]["yopo"].update(cut=24, reference_depth=28, heads_fraction=0.5)
    plan = resolve_arch(arch, 28, 28, "qwen2_vl")
    assert [i for i, p in enumerate(plan.layers) if p.drop_visual] == [24]
    assert len(plan.layers[5].visual_heads) == 14


@pytest.mark.parametrize("name", ["dense", "fastv", "vtw", "shortv", "yopo", "vica", "random", "uniform", "pool", "dominant"])
def test_analytic_llm_flops_match_the_flop_counter_on_qwen(name):
    """On Qwen2-VL (a grid per image, rows of different lengths) the analytic LLM count of one image's
    layout (`image_places` from its size) equals FlopCounterMode on the real decoder."""
    from models.blind_scores import image_keys_for
    from models.decoder import run_decoder
    from models.flops import ImageTokens, Shape, plan_terms
    from models.mllm import query_index
    from models.streams import images_per_row
    from tests.test_plans_qwen import qwen_plan_model

    model = qwen_plan_model("qwen2_vl", name, {})
    ids, mask, pixels, grids, _ = qwen_batch(model.config, prefix=3, suffix=9)
    config, shape = model.config, Shape.from_hf(model.text_config)
    start = 0
    for row, grid in enumerate(grids.tolist()):  # one row (one image) at a time: the analytic count is per sample
        n = grid[0] * grid[1] * grid[2]
        keep = mask[row].bool()
        one_ids, one_mask, one_pixels, one_grid = ids[row : row + 1, keep], mask[row : row + 1, keep], pixels[start : start + n], grids[row : row + 1]
        start += n
        with torch.no_grad():
            _, text, vis = model.embed_inputs(one_ids, one_mask, one_pixels, one_grid)
            keys = image_keys_for(model.plan, model.family.image_pixels(model.config, one_pixels, one_grid), images_per_row(vis))
            measured, _ = measure_flops(run_decoder, model.language_model, model.plan, text, vis, query_index(text, None),
                                        model.xattn, image_keys=keys, routing=model.routing())
        image = ImageTokens.from_places(config.model_family.image_places(config, tuple(grid)))
        terms, _ = plan_terms(shape, model.plan, image, text.n)
        assert abs(sum(terms.values()) - measured) / measured < 0.02, (name, row, sum(terms.values()), measured)
