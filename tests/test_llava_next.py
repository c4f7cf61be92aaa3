"""LLaVA-NeXT (family `llava_next`): our forward equals transformers' `LlavaNextForConditionalGeneration`
on the same weights (fp32), on a batch of a wide, a tall and a 2 x 2-tile image with left padding;
greedy generation with the KV cache equals HF `generate`; directories transformers writes load, and
ours load into transformers; preprocessing and placeholder counts are transformers' own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaNextForConditionalGeneration

from models import MLLM
from models.streams import Place
from tests.helpers import assert_greedy_matches_hf, exported_pair, next_batch, next_images, tiny_next_config


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Our model and HF's, loaded from our export (so this also checks save_pretrained)."""
    return exported_pair(tiny_next_config(), LlavaNextForConditionalGeneration, tmp_path_factory.mktemp("next") / "export")


def hf_forward(hf, ids, mask, pixels, sizes):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what HF generate uses under left padding
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes, position_ids=positions).logits


def test_token_counts_follow_the_image_size(pair):
    ours, hf = pair
    config = ours.config
    for image in next_images():
        size = (image.height, image.width)
        pixels = config.model_family.image_processor(config)(image).pixels
        with torch.no_grad():
            features = hf.model.get_image_features(pixels[None], torch.tensor([size])).pooler_output[0]
        assert config.tokens_per_image(size) == features.shape[0]  # transformers' own packing
        tokens = ours.encode_images(pixels[None], torch.tensor([size]))
        assert torch.allclose(tokens.h, features, atol=1e-6)
        extra = tokens.place[:, Place.EXTRA].bool()
        _, _, rows, cols = config.model_family._grid(config, size)
        g2 = config.grid_size**2
        assert torch.equal(extra[g2:].view(len(rows), len(cols) + 1)[:, -1], torch.ones(len(rows), dtype=torch.bool))  # a newline ends each row
        assert int(extra.sum()) == len(rows) and not bool(extra[:g2].any())
        assert torch.equal(tokens.h[extra], ours.image_newline.expand(int(extra.sum()), -1))


@pytest.mark.parametrize("pad_left", [None, [0, 3, 5]], ids=["no-padding", "left-padding"])
def test_logits_match_hf(pair, pad_left):
    ours, hf = pair
    ids, mask, pixels, sizes = next_batch(ours.config, pad_left=pad_left)
    with torch.no_grad():
        got = ours(ids, mask, pixels, image_sizes=sizes).logits
    want = hf_forward(hf, ids, mask, pixels, sizes)
    valid = mask.bool()
    assert torch.isfinite(got[valid]).all()
    assert (got - want)[valid].abs().max().item() <= 1e-5


def test_loss_matches_hf(pair):
    ours, hf = pair
    ids, mask, pixels, sizes = next_batch(ours.config)
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]  # the text after each image (its first token stays unsupervised)
    with torch.no_grad():
        got = ours(ids, mask, pixels, labels=labels, image_sizes=sizes).loss
        want = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes, labels=labels).loss
    assert abs(got.item() - want.item()) <= 1e-5


def test_greedy_generation_matches_hf(pair):
    ours, hf = pair
    ids, mask, pixels, sizes = next_batch(ours.config, pad_left=[0, 2, 4], seed=1)
    assert_greedy_matches_hf(ours, hf, ids, mask, pixels, {"pixel_values": pixels, "image_sizes": sizes}, image_sizes=sizes)


def test_directories_transformers_writes_load_and_ours_round_trip(pair, tmp_path):
    ours, hf = pair
    hf.save_pretrained(tmp_path / "hf")
    loaded = MLLM.from_pretrained(tmp_path / "hf").eval()
    ids, mask, pixels, sizes = next_batch(ours.config, pad_left=[0, 2, 1])
    with torch.no_grad():
        want = ours(ids, mask, pixels, logits="last", image_sizes=sizes).logits
        assert torch.equal(loaded(ids, mask, pixels, logits="last", image_sizes=sizes).logits, want)
    loaded.save_pretrained(tmp_path / "again")
    again = MLLM.from_pretrained(tmp_path / "again").eval()
    assert again.family.name == "llava_next" and again.config.image_grid_pinpoints == ours.config.image_grid_pinpoints
    assert again.config.hf_config().to_dict() == ours.config.hf_config().to_dict()
    with torch.no_grad():
        assert torch.equal(again(ids, mask, pixels, logits="last", image_sizes=sizes).logits, want)


def test_preprocessing_and_placeholders_are_the_llava_next_processors(pair, tmp_path):
    """transformers' `LlavaNextProcessor` (PIL image processor + a local tokenizer) gives the same
    pixels and as many `<image>` placeholders as our family counts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaNextProcessor, PreTrainedTokenizerFast

    ours, _ = pair
    config = ours.config
    vocab = {f"w{i}": i for i in range(4, 100)} | {"<pad>": 0, "<s>": 1, "</s>": 2, "<image>": config.image_token_id}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", additional_special_tokens=["<image>"])
    family_processor = config.model_family.image_processor(config)
    processor = LlavaNextProcessor(family_processor.processor, tokenizer, patch_size=config.hf_vision_config().patch_size,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>")
    for image in next_images():
        out = processor(images=[image], text=["w4 <image> w5"], return_tensors="pt")
        size = (image.height, image.width)
        assert int((out["input_ids"] == config.image_token_id).sum()) == config.tokens_per_image(size)
        assert torch.equal(out["pixel_values"][0], family_processor(image).pixels)
        assert out["image_sizes"][0].tolist() == list(size)
