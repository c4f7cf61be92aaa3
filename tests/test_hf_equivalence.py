"""Our decoder forward equals HF `LlavaForConditionalGeneration` on the same weights (fp32)."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from models import MLLM
from tests.helpers import assert_greedy_matches_hf, image_batch, tiny_model

FAMILIES = [("clip", "llama"), ("siglip", "qwen2")]


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request, tmp_path_factory):
    """Our model and HF's, loaded from our export (so this also checks save_pretrained)."""
    vision, text = request.param
    ours = tiny_model(vision=vision, text=text)
    path = tmp_path_factory.mktemp(f"{vision}-{text}") / "export"
    ours.save_pretrained(path)
    hf = LlavaForConditionalGeneration.from_pretrained(path).eval()
    return ours, hf


def hf_logits(hf, ids, mask, pixels):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what HF generate uses under left padding
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=positions).logits


@pytest.mark.parametrize("pad_left", [None, [0, 3, 5]], ids=["no-padding", "left-padding"])
def test_logits_match_hf(pair, pad_left):
    ours, hf = pair
    ids, mask, pixels = image_batch(ours.config, batch=3, pad_left=pad_left)
    with torch.no_grad():
        got = ours(ids, mask, pixels).logits
    want = hf_logits(hf, ids, mask, pixels)
    valid = mask.bool()
    assert torch.isfinite(got[valid]).all()
    assert (got - want)[valid].abs().max().item() <= 1e-5


def test_right_padding_matches_hf(pair):
    ours, hf = pair
    ids, mask, pixels = image_batch(ours.config, batch=2)
    mask[1, -4:] = 0
    ids[1, -4:] = 0
    with torch.no_grad():
        got = ours(ids, mask, pixels).logits
    want = hf_logits(hf, ids, mask, pixels)
    assert (got - want)[mask.bool()].abs().max().item() <= 1e-5


def test_loss_matches_hf(pair):
    ours, hf = pair
    ids, mask, pixels = image_batch(ours.config, batch=2)
    labels = ids.clone()
    labels[:, : 3 + ours.config.num_image_tokens + 1] = -100  # supervise only text after the image
    with torch.no_grad():
        got = ours(ids, mask, pixels, labels=labels).loss
        want = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
    assert abs(got.item() - want.item()) <= 1e-5


def test_greedy_generation_matches_hf(pair):
    ours, hf = pair
    ids, mask, pixels = image_batch(ours.config, batch=3, pad_left=[0, 2, 4], seed=1)
    assert_greedy_matches_hf(ours, hf, ids, mask, pixels, {"pixel_values": pixels})


def test_export_roundtrip_identical_logits(pair, tmp_path):
    ours, _ = pair
    ours.save_pretrained(tmp_path / "again")
    loaded = MLLM.from_pretrained(tmp_path / "again").eval()
    ids, mask, pixels = image_batch(ours.config, batch=2, pad_left=[0, 2])
    with torch.no_grad():
        assert torch.equal(ours(ids, mask, pixels, logits="last").logits, loaded(ids, mask, pixels, logits="last").logits)


def test_loads_hub_and_v5_weight_names(pair, tmp_path):
    """A checkpoint saved by transformers itself (v5 naming) loads into our MLLM unchanged."""
    ours, hf = pair
    hf.save_pretrained(tmp_path / "hf")
    loaded = MLLM.from_pretrained(tmp_path / "hf").eval()
    ids, mask, pixels = image_batch(ours.config, batch=2)
    with torch.no_grad():
        assert torch.equal(ours(ids, mask, pixels, logits="last").logits, loaded(ids, mask, pixels, logits="last").logits)
