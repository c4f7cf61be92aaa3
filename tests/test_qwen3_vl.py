"""Qwen3-VL and Qwen3-VL-MoE (families `qwen3_vl`, `qwen3_vl_moe`): our forward equals transformers'
`Qwen3VLForConditionalGeneration` / `Qwen3VLMoeForConditionalGeneration` on the same weights (fp32) on a
left-padded batch of a row with one image, a text-only row and a row with two images (three grids of
different sizes): logits, loss and the MoE load-balancing loss; our M-RoPE positions equal
`get_rope_index`; greedy generation with the KV cache equals `generate`; DeepStack's features reach
the LLM (turning them off changes the logits); directories transformers writes load, ours load into
transformers; the tower's patches and the preprocessing are transformers' own."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from models import MLLM
from tests.helpers import (MIXED_ROWS as MIXED, assert_forward_matches_hf, assert_greedy_matches_hf, assert_hf_directories_round_trip,
                           assert_positions_match_get_rope_index, exported_pair, image_patches, qwen_batch, tiny_qwen3_vl_config)

HF_CLASSES = {"qwen3_vl": Qwen3VLForConditionalGeneration, "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration}


@pytest.fixture(scope="module", params=sorted(HF_CLASSES))
def pair(request, tmp_path_factory):
    """Our model and HF's, loaded from our export (so this also checks save_pretrained)."""
    config = tiny_qwen3_vl_config(moe=request.param == "qwen3_vl_moe")
    return exported_pair(config, HF_CLASSES[request.param], tmp_path_factory.mktemp(request.param) / "export")


def test_positions_equal_get_rope_index(pair):
    assert_positions_match_get_rope_index(*pair)


def test_logits_loss_and_aux_loss_match_hf(pair):
    ours, hf = pair
    assert_forward_matches_hf(ours, hf, load_balancing_loss_func if ours.family.name == "qwen3_vl_moe" else None)


def test_deepstack_features_reach_the_llm(pair):
    """Each visual token carries one feature per DeepStack merger (equal to transformers' own), and
    without them the logits change: the injections are not a no-op in this test's model."""
    ours, hf = pair
    ids, mask, pixels, grids, types = qwen_batch(ours.config, **MIXED)
    with torch.no_grad():
        tokens = ours.encode_images(pixels, grids)
        theirs = hf.model.get_image_features(pixels, grids)
        want = torch.stack([torch.cat(f) for f in theirs.deepstack_features], 1)
        assert tokens.inject.shape == (tokens.h.shape[0], 2, 64)
        assert torch.allclose(tokens.inject, want, atol=1e-6)
        assert torch.allclose(tokens.h, torch.cat(theirs.pooler_output), atol=1e-6)
        with_ds = ours(ids, mask, pixels, image_sizes=grids).logits
        ours.deepstack_mergers.requires_grad_(False)
        saved = [p.detach().clone() for p in ours.deepstack_mergers.parameters()]
        for p in ours.deepstack_mergers.parameters():
            p.zero_()  # every merger writes zeros: no injection
        without = ours(ids, mask, pixels, image_sizes=grids).logits
        for p, s in zip(ours.deepstack_mergers.parameters(), saved):
            p.copy_(s)
    assert (with_ds - without)[mask.bool()].abs().max() > 1e-4


def test_greedy_generation_matches_hf(pair):
    ours, hf = pair
    ids, mask, pixels, grids, types = qwen_batch(ours.config, seed=1, **MIXED)
    assert_greedy_matches_hf(ours, hf, ids, mask, pixels, {"pixel_values": pixels, "image_grid_thw": grids, "mm_token_type_ids": types},
                             image_sizes=grids)


def test_directories_transformers_writes_load_and_ours_round_trip(pair, tmp_path):
    ours, hf = pair
    ids, mask, pixels, grids, _ = qwen_batch(ours.config, pad_left=[0, 2, 1])
    assert_hf_directories_round_trip(ours, hf, tmp_path, (ids, mask, pixels, grids))


def test_a_hub_config_gets_the_released_pixel_bounds(pair, tmp_path):
    """A directory without our own fields (as the Hub's) takes the released preprocessor's bounds."""
    import json

    _, hf = pair
    hf.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    hub = json.loads(path.read_text())
    hub.pop("efficient_mllm")  # transformers keeps our export's extra key; the Hub's files have none
    path.write_text(json.dumps(hub))
    config = MLLM.from_pretrained(tmp_path / "hf").config
    assert (config.min_pixels, config.max_pixels) == (65536, 16777216)
    assert config.image_mean == (0.5, 0.5, 0.5) and config.image_std == (0.5, 0.5, 0.5)


def test_preprocessing_is_transformers(pair):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from tests.helpers import qwen_images

    ours, _ = pair
    config = ours.config
    theirs = Qwen2VLImageProcessorPil(min_pixels=config.min_pixels, max_pixels=config.max_pixels, patch_size=4, merge_size=2,
                                      image_mean=[0.5] * 3, image_std=[0.5] * 3)
    for image in qwen_images():
        mine = config.model_family.image_processor(config)(image)
        out = theirs(images=[image], return_tensors="pt")
        assert torch.equal(mine.pixels, out["pixel_values"]) and list(mine.size) == out["image_grid_thw"][0].tolist()
        assert config.tokens_per_image((image.height, image.width)) == config.tokens_per_image(mine.size)


def test_vision_flops_equal_the_flop_counter():
    """Tower (patch embedding, blocks), projector (the merger) and DeepStack mergers of each image equal
    FlopCounterMode on the real tiny modules."""
    from models.flops import measure_flops

    model = MLLM.from_config(tiny_qwen3_vl_config()).eval()
    _, _, pixels, grids, _ = qwen_batch(model.config)
    for one, thw in image_patches(pixels, grids):
        with torch.no_grad():
            tower, out = measure_flops(model.family.run_tower, model.vision_tower, one, thw, False)
            projector, _ = measure_flops(model.multi_modal_projector, out.features)
            deepstack, _ = measure_flops(model.family.injections, model, out.captured)
        assert model.family.vision_flops(model.config, tuple(thw[0].tolist())) == {"tower": tower, "projector": projector, "deepstack": deepstack}
