"""Qwen2-VL and Qwen2.5-VL (families `qwen2_vl`, `qwen2_5_vl`): our forward equals transformers'
`Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration` on the same weights
(fp32), on a batch of three images of different sizes with left padding; our M-RoPE positions equal
`get_rope_index`; greedy generation with the KV cache (positions from our own counter) equals HF
`generate`; directories transformers writes load, and ours load into transformers; preprocessing
and placeholder counts are transformers' own."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from models import MLLM
from models.families.qwen2_vl import mrope_row
from tests.helpers import assert_greedy_matches_hf, assert_hf_directories_round_trip, qwen_batch, qwen_images, tiny_qwen_config

HF_CLASSES = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def pair(request, tmp_path_factory):
    """Our model and HF's, loaded from our export (so this also checks save_pretrained)."""
    torch.manual_seed(0)
    ours = MLLM.from_config(tiny_qwen_config(request.param)).eval()
    path = tmp_path_factory.mktemp(request.param) / "export"
    ours.save_pretrained(path)
    hf = HF_CLASSES[request.param].from_pretrained(path).eval()
    return ours, hf


def hf_logits(hf, ids, mask, pixels, grids, types):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grids, mm_token_type_ids=types).logits


def test_the_small_example_of_the_rope_rule():
    """3 text tokens, a 4 x 6 token grid, 3 text tokens: the image sits at t = 3, h = 3..6, w = 3..8
    and the text after it continues at 9 (the image advanced the index by max(4, 6) = 6 only)."""
    is_image = torch.tensor([False] * 3 + [True] * 24 + [False] * 3)
    pos = mrope_row(is_image, torch.tensor([[1, 8, 12]]), merge=2)
    assert pos[:, :3].tolist() == [[0, 1, 2]] * 3
    assert set(pos[0, 3:27].tolist()) == {3} and pos[1, 3:27].unique().tolist() == [3, 4, 5, 6]
    assert pos[2, 3:27].unique().tolist() == list(range(3, 9))
    assert pos[:, 27:].tolist() == [[9, 10, 11]] * 3


@pytest.mark.parametrize("pad_left", [None, [0, 3, 5]], ids=["no-padding", "left-padding"])
def test_positions_equal_get_rope_index(pair, pad_left):
    ours, hf = pair
    ids, mask, pixels, grids, types = qwen_batch(ours.config, pad_left=pad_left)
    want, deltas = hf.model.get_rope_index(ids, types, grids, attention_mask=mask)
    got = ours.prompt_positions(ids, mask, grids)
    assert torch.equal(got * mask, want * mask)
    from models.mllm import next_positions

    assert torch.equal(next_positions(got, mask), mask.sum(1) + deltas.flatten())  # decoding's start: length + rope delta


@pytest.mark.parametrize("pad_left", [None, [0, 3, 5]], ids=["no-padding", "left-padding"])
def test_logits_match_hf(pair, pad_left):
    ours, hf = pair
    ids, mask, pixels, grids, types = qwen_batch(ours.config, pad_left=pad_left)
    assert len(set(grids.prod(-1).tolist())) == 3  # three images of different sizes
    with torch.no_grad():
        got = ours(ids, mask, pixels, image_grid_thw=grids, mm_token_type_ids=types).logits
    want = hf_logits(hf, ids, mask, pixels, grids, types)
    valid = mask.bool()
    assert torch.isfinite(got[valid]).all()
    assert (got - want)[valid].abs().max().item() <= 1e-5


def test_loss_matches_hf(pair):
    ours, hf = pair
    ids, mask, pixels, grids, types = qwen_batch(ours.config)
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]  # the text after each image
    with torch.no_grad():
        got = ours(ids, mask, pixels, labels=labels, image_sizes=grids).loss
        want = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grids, mm_token_type_ids=types,
                  labels=labels).loss
    assert abs(got.item() - want.item()) <= 1e-5


def test_greedy_generation_matches_hf(pair):
    ours, hf = pair
    ids, mask, pixels, grids, types = qwen_batch(ours.config, pad_left=[0, 2, 4], seed=1)
    got = assert_greedy_matches_hf(ours, hf, ids, mask, pixels,
                                   {"pixel_values": pixels, "image_grid_thw": grids, "mm_token_type_ids": types}, image_sizes=grids)
    assert got.shape[1] == 10


def test_directories_transformers_writes_load_and_ours_round_trip(pair, tmp_path):
    ours, hf = pair
    ids, mask, pixels, grids, _ = qwen_batch(ours.config, pad_left=[0, 2, 1])
    assert_hf_directories_round_trip(ours, hf, tmp_path, (ids, mask, pixels, grids))


def test_the_directorys_image_processor_sets_the_pixel_bounds(tmp_path):
    """A directory transformers wrote with its Qwen2VLImageProcessorPil (pixel bounds and mean / std other than the
    processor's defaults): MLLM.from_pretrained preprocesses and counts tokens as that processor does."""
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    Qwen2VLForConditionalGeneration(Qwen2VLConfig(**tiny_qwen_config().hf_config().to_dict())).save_pretrained(tmp_path)
    theirs = Qwen2VLImageProcessorPil(min_pixels=8 * 8 * 6, max_pixels=8 * 8 * 20, patch_size=4, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    theirs.save_pretrained(tmp_path)
    config = MLLM.from_pretrained(tmp_path).config
    assert (config.min_pixels, config.max_pixels) == (8 * 8 * 6, 8 * 8 * 20)
    for image in qwen_images():
        mine, out = config.model_family.image_processor(config)(image), theirs(images=[image], return_tensors="pt")
        assert torch.equal(mine.pixels, out["pixel_values"]) and list(mine.size) == out["image_grid_thw"][0].tolist()
        assert config.tokens_per_image((image.height, image.width)) == int(out["image_grid_thw"][0].prod()) // 4


def test_preprocessing_and_token_counts_are_transformers(pair):
    """Our image processor is transformers' `Qwen2VLImageProcessorPil` at the config's pixel bounds;
    the token count from an image's original size (`smart_resize`) equals what the tower gives."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ours, hf = pair
    config = ours.config
    theirs = Qwen2VLImageProcessorPil(min_pixels=config.min_pixels, max_pixels=config.max_pixels, patch_size=4)
    for image in qwen_images():
        mine = config.model_family.image_processor(config)(image)
        out = theirs(images=[image], return_tensors="pt")
        assert torch.equal(mine.pixels, out["pixel_values"]) and list(mine.size) == out["image_grid_thw"][0].tolist()
        with torch.no_grad():
            features = hf.model.get_image_features(mine.pixels, out["image_grid_thw"]).pooler_output[0]
        assert config.tokens_per_image((image.height, image.width)) == config.tokens_per_image(mine.size) == features.shape[0]
        tokens = ours.encode_images(mine.pixels, out["image_grid_thw"])
        assert (tokens.h - features).abs().max().item() <= 1e-5


def test_bad_inputs_fail_clearly(pair):
    ours, _ = pair
    ids, mask, pixels, grids, types = qwen_batch(ours.config)
    with pytest.raises(ValueError, match="mm_token_type_ids marks other tokens"):
        ours(ids, mask, pixels, image_grid_thw=grids, mm_token_type_ids=torch.zeros_like(types))
    with pytest.raises(ValueError, match="expected \\[148, patch pixels\\]"):
        ours(ids, mask, pixels[:-4], image_grid_thw=grids)
    from tests.test_plans import plan_model

    with pytest.raises(ValueError, match="renumbers RoPE positions"):
        plan_model("pdrop", {"positions": "renumber"}, config=ours.config)  # no meaning for M-RoPE triples


def test_the_merger_trains_as_the_projector_while_the_tower_is_frozen():
    """LLaVA's stage 1 on Qwen: with the tower and LLM frozen, only the PatchMerger (our
    `multi_modal_projector`) gets gradients, and the tower keeps no autograd graph."""
    from train.stage import StageConfig, apply_stage

    torch.manual_seed(0)
    model = MLLM.from_config(tiny_qwen_config())
    apply_stage(model, StageConfig("pretrain", train_vision=False, train_projector=True, train_llm=False))
    ids, mask, pixels, grids, _ = qwen_batch(model.config)
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    model(ids, mask, pixels, labels=labels, image_sizes=grids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.multi_modal_projector.parameters())
    assert all(p.grad is None for p in [*model.vision_tower.parameters(), *model.language_model.parameters()])


def test_two_images_in_a_row_and_a_text_only_row_match_hf(pair):
    """Rows hold two images, none, or one: positions and logits still equal transformers'."""
    from tests.helpers import QWEN_TOKENS, left_padded

    ours, hf = pair
    config = ours.config
    processed = [config.model_family.image_processor(config)(im) for im in qwen_images()]
    start, end, pad = QWEN_TOKENS["vision_start_token_id"], QWEN_TOKENS["vision_end_token_id"], config.image_token_id

    def image(k):
        return [start, *[pad] * config.tokens_per_image(processed[k].size), end]

    rows = [[9, 10, *image(0), 11, *image(1), 12], [13, 14, 15, 16], [*image(2), 17, 18]]
    ids, mask = left_padded([torch.tensor(r) for r in rows], [0, 0, 2])
    types = ((ids == pad) & mask.bool()).long()
    grids = torch.tensor([p.size for p in processed])
    pixels = torch.cat([p.pixels for p in processed])
    want_pos, _ = hf.model.get_rope_index(ids, types, grids, attention_mask=mask)
    assert torch.equal(ours.prompt_positions(ids, mask, grids) * mask, want_pos * mask)
    with torch.no_grad():
        got = ours(ids, mask, pixels, image_grid_thw=grids, mm_token_type_ids=types).logits
    want = hf_logits(hf, ids, mask, pixels, grids, types)
    assert (got - want)[mask.bool()].abs().max().item() <= 1e-5


def test_the_released_checkpoints_flat_config_json_loads(pair, tmp_path):
    """The Hub's Qwen2-VL / Qwen2.5-VL config.json keeps the text fields at the top level (with
    `rope_scaling`), as transformers 4.x wrote it: it loads into the same model."""
    import json
    import shutil

    ours, hf = pair
    hf.save_pretrained(tmp_path / "hf")
    shutil.copytree(tmp_path / "hf", tmp_path / "flat")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope["rope_theta"]
    text["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    flat = {**{k: v for k, v in text.items() if k != "model_type"}, **config}
    (tmp_path / "flat" / "config.json").write_text(json.dumps(flat))
    loaded = MLLM.from_pretrained(tmp_path / "flat").eval()
    assert loaded.config.hf_text_config().num_hidden_layers == ours.config.hf_text_config().num_hidden_layers
    ids, mask, pixels, grids, _ = qwen_batch(ours.config, pad_left=[0, 2, 1])
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask, pixels, logits="last", image_sizes=grids).logits,
                           ours(ids, mask, pixels, logits="last", image_sizes=grids).logits)
