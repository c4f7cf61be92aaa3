"""FLOPs of Qwen3.5's hybrid LLM: the analytic count (models/flops.py: gated attention's doubled query
projection, and per linear-attention layer the input projections, the conv, the chunked delta rule with its
triangular solves, the output gate and out_proj of the tokens that get an output) equals FlopCounterMode on
the real decoder, bit for bit, under every plan that runs; the tower and projector equal it too; and at the
released shapes (`python -m train flops model=qwen3_5_27b` / `qwen3_5_35b_a3b`) the split per layer kind
shows where pruning saves."""

from __future__ import annotations

import pytest
import torch

from models import MLLM
from models.flops import ImageTokens, Shape, measure_flops, plan_terms
from tests.helpers import qwen_batch, tiny_qwen3_5_config
from tests.test_plans_qwen3_5 import qwen35_plan_model

PLANS = ["dense", "fastv", "vtw", "shortv", "vica", "random", "uniform", "pool", "dominant", "xattn", "pmod"]
CASES = [(name, False) for name in PLANS] + [(name, True) for name in ("dense", "fastv", "shortv", "vica")]  # MoE: its FFN


@pytest.mark.parametrize("name, moe", CASES, ids=[f"{n}{'-moe' if m else ''}" for n, m in CASES])
def test_analytic_llm_flops_equal_the_flop_counter(name, moe):
    """One row (one image) at a time, as the analytic count is per sample: equal to the FLOP."""
    from models.blind_scores import image_keys_for
    from models.decoder import run_decoder
    from models.mllm import query_index
    from models.streams import images_per_row

    model = qwen35_plan_model(name, {}, moe=moe)
    ids, mask, pixels, grids, _ = qwen_batch(model.config, prefix=3, suffix=9)
    config, shape = model.config, Shape.from_hf(model.text_config)
    assert shape.gated and shape.linear is not None and sum(shape.linear.layers) == 6
    start = 0
    for row, grid in enumerate(grids.tolist()):
        n = grid[0] * grid[1] * grid[2]
        keep = mask[row].bool()
        one = (ids[row : row + 1, keep], mask[row : row + 1, keep], pixels[start : start + n], grids[row : row + 1])
        start += n
        with torch.no_grad():
            _, text, vis = model.embed_inputs(*one)
            keys = image_keys_for(model.plan, model.family.image_pixels(model.config, one[2], one[3]), images_per_row(vis))
            measured, _ = measure_flops(run_decoder, model.language_model, model.plan, text, vis, query_index(text, None),
                                        model.xattn, image_keys=keys, routing=model.routing())
        terms, _ = plan_terms(shape, model.plan, ImageTokens.from_places(config.model_family.image_places(config, tuple(grid))), text.n)
        assert sum(terms.values()) == measured, (name, row, sum(terms.values()), measured)


def test_vision_flops_equal_the_flop_counter():
    """Tower (patch embedding, blocks) and projector (the merger) of each image; no DeepStack part."""
    model = MLLM.from_config(tiny_qwen3_5_config()).eval()
    _, _, pixels, grids, _ = qwen_batch(model.config)
    start = 0
    for grid in grids.tolist():
        n = grid[0] * grid[1] * grid[2]
        one, thw = pixels[start : start + n], torch.tensor([grid])
        start += n
        with torch.no_grad():
            tower, out = measure_flops(model.family.run_tower, model.vision_tower, one, thw, False)
            projector, _ = measure_flops(model.multi_modal_projector, out.features)
        assert model.family.vision_flops(model.config, tuple(grid)) == {"tower": tower, "projector": projector}


def flops(*overrides) -> dict:
    from train.tools.cli import compose_cli
    from train.tools.flops import flops_report

    return flops_report(compose_cli("flops", list(overrides)))


def test_released_shapes_split_by_layer_kind():
    """`python -m train flops model=qwen3_5_27b arch=<a> flops.image_size=[1344,1344]` (1764 visual tokens, 64
    text): the linear-attention layers (48 of 64) hold 68.0 of the LLM's 91.0 TFLOPs. Removing tokens saves about
    as much there as in the full-attention layers (FastV 0.548 against 0.534), since both kinds are dominated by
    per-token projections and the FFN; freezing saves less there (ShortV, whose frozen layers all fall on linear
    layers: 0.674), because a frozen token still runs its input projections, conv and state update. At 16,384
    visual tokens the full layers' attention grows quadratically and pruning saves more there (0.451 against
    0.533)."""
    dense = flops("model=qwen3_5_27b", "arch=dense", "flops.image_size=[1344,1344]")
    assert dense["n_visual"] == 1764 and dense["deepstack_tflops"] is None
    kinds = dense["layer_kinds"]
    assert kinds["linear_attention"]["dense_tflops"] == pytest.approx(67.958, abs=1e-3)
    assert kinds["full_attention"]["dense_tflops"] == pytest.approx(23.089, abs=1e-3)
    fastv = flops("model=qwen3_5_27b", "arch=fastv", "flops.image_size=[1344,1344]")["layer_kinds"]
    assert fastv["linear_attention"]["ratio"] == pytest.approx(0.5477, abs=1e-4)
    assert fastv["full_attention"]["ratio"] == pytest.approx(0.5343, abs=1e-4)
    shortv = flops("model=qwen3_5_27b", "arch=shortv", "flops.image_size=[1344,1344]")["layer_kinds"]
    assert shortv["linear_attention"]["ratio"] == pytest.approx(0.6742, abs=1e-4) and shortv["full_attention"]["ratio"] == 1.0
    long = flops("model=qwen3_5_27b", "arch=fastv", "flops.image_size=[4096,4096]")["layer_kinds"]
    assert long["full_attention"]["ratio"] == pytest.approx(0.4506, abs=1e-4)
    assert long["linear_attention"]["ratio"] == pytest.approx(0.5331, abs=1e-4)


def test_the_moe_release_counts_active_parameters_and_the_shared_expert():
    """Qwen3.5-35B-A3B: per token and layer the router over 256 experts, 8 experts of 512 and the shared
    expert of 512 with its gate; the LLM at 1344 x 1344 is 9.75 TFLOPs dense, FastV 0.553 of it."""
    from omegaconf import OmegaConf

    from models import MLLMConfig
    from tests.test_configs import compose_train

    config = MLLMConfig.from_dict(OmegaConf.to_container(compose_train(["model=qwen3_5_35b_a3b"]).model.config, resolve=True))
    shape = Shape.from_hf(config.hf_text_config())
    assert shape.moe.shared == 512 and shape.ffn_per_token(0, 3) == 2 * 2048 * 256 + 8 * 6 * 2048 * 512 + 6 * 2048 * 512 + 2 * 2048
    assert flops("model=qwen3_5_35b_a3b", "arch=dense", "flops.image_size=[1344,1344]")["dense_tflops"] == pytest.approx(9.751, abs=1e-3)
    assert flops("model=qwen3_5_35b_a3b", "arch=fastv", "flops.image_size=[1344,1344]")["ratio"] == pytest.approx(0.5531, abs=1e-4)
