"""InternVL (family `internvl`): our forward equals transformers' `InternVLForConditionalGeneration`
on the same weights (fp32), on a batch of a 5-tile, a 3-tile and a 1-tile image with left padding;
greedy generation with the KV cache equals HF `generate`; directories transformers writes load, and
ours load into transformers; preprocessing is GotOcr2's and placeholder counts follow InternVL's
processor (`replace_image_token`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import InternVLForConditionalGeneration
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.internvl.processing_internvl import InternVLProcessor

from models import MLLM, MLLMConfig
from models.streams import Place
from tests.helpers import (assert_greedy_matches_hf, exported_pair, internvl_hf_batch, internvl_images, next_batch,
                           tiny_internvl_config)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Our model and HF's, loaded from our export (so this also checks save_pretrained)."""
    return exported_pair(tiny_internvl_config(), InternVLForConditionalGeneration, tmp_path_factory.mktemp("internvl") / "export")


def batch(config, **kw):
    """`next_batch` over InternVL's images, and the same tiles flat [sum tiles, 3, S, S] (HF's input)."""
    ids, mask, pixels, sizes = next_batch(config, images=internvl_images, **kw)
    n_tiles = [config.model_family.tiles_per_image(config, s) for s in sizes.tolist()]
    return ids, mask, pixels, sizes, torch.cat([p[:n] for p, n in zip(pixels, n_tiles)])


def hf_forward(hf, ids, mask, flat, **kw):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what HF generate uses under left padding
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, pixel_values=flat, position_ids=positions, **kw)


def test_tiles_tokens_and_places_follow_transformers(pair):
    ours, hf = pair
    config = ours.config
    for image in internvl_images():
        size = (image.height, image.width)
        pixels = config.model_family.image_processor(config)(image).pixels
        with torch.no_grad():
            features = hf.model.get_image_features(pixels).pooler_output  # [tiles, 16, d]
        assert config.tokens_per_image(size) == features.shape[0] * features.shape[1]
        tokens = ours.encode_images(pixels, torch.tensor([size]))
        assert torch.allclose(tokens.h, features.reshape(-1, features.shape[-1]), atol=1e-6)
        side = config.grid_size // 2
        unit = tokens.place[:, Place.UNIT].view(len(pixels), side * side)
        assert torch.equal(unit, torch.arange(len(pixels))[:, None].expand_as(unit))  # one unit per tile, thumbnail last
        assert tokens.place[:, Place.ROW].max() == side - 1 and not bool(tokens.place[:, Place.EXTRA].any())


def test_preprocessing_and_placeholders_are_internvl_processors(pair):
    """Pixels equal `GotOcr2ImageProcessorPil(crop_to_patches=True)` (InternVL's image processor);
    the placeholders equal what `InternVLProcessor.replace_image_token` writes between <img> and </img>."""
    ours, hf = pair
    config = ours.config
    processor = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, max_patches=4,
                                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    rule = SimpleNamespace(start_image_token="<img>", end_image_token="</img>", image_token="<ctx>",
                           image_seq_length=hf.config.image_seq_length)
    for image in internvl_images():
        out = processor(images=[image], return_tensors="pt")
        assert torch.equal(out["pixel_values"], config.model_family.image_processor(config)(image).pixels)
        text = InternVLProcessor.replace_image_token(rule, {"num_patches": out["num_patches"].tolist()}, 0)
        assert text.startswith("<img>") and text.endswith("</img>")
        assert text.count("<ctx>") == config.tokens_per_image((image.height, image.width))


def test_token_counts_at_internvl_sizes():
    """The counts of families.md §9.1 (12 tiles at most): 448² 256, 672² 1280, 1344² 2560, 480 x 640 3328."""
    vision = dict(model_type="internvl_vision", hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=448, patch_size=14)
    text = dict(model_type="qwen2", hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=128)
    config = MLLMConfig(vision=vision, text=text, family="internvl", vision_feature_layer=-1)
    assert [config.tokens_per_image(s) for s in ((448, 448), (672, 672), (1344, 1344), (480, 640))] == [256, 1280, 2560, 3328]
    assert MLLMConfig(vision=vision, text=text, family="internvl", vision_feature_layer=-1, max_tiles=6).tokens_per_image((480, 640)) == 1792


@pytest.mark.parametrize("pad_left", [None, [0, 3, 5]], ids=["no-padding", "left-padding"])
def test_logits_match_hf(pair, pad_left):
    ours, hf = pair
    ids, mask, pixels, sizes, flat = batch(ours.config, pad_left=pad_left)
    with torch.no_grad():
        got = ours(ids, mask, pixels, image_sizes=sizes).logits
        got_flat = ours(ids, mask, flat, image_sizes=sizes).logits
    want = hf_forward(hf, ids, mask, flat).logits
    valid = mask.bool()
    assert torch.isfinite(got[valid]).all()
    assert (got - want)[valid].abs().max().item() <= 1e-5
    assert torch.equal(got_flat[valid], got[valid])


def test_transformers_inputs_without_sizes_match_hf(pair):
    """transformers' own inputs (all tiles flat, no image sizes): each image's tiles follow from its run of
    placeholders, on a batch with two images in a row, a text-only row and left padding; logits equal
    transformers' and ours given the sizes; greedy generation equals `generate`."""
    ours, hf = pair
    ids, mask, flat, padded, sizes = internvl_hf_batch(ours.config, pad_left=[0, 3, 1])
    with torch.no_grad():
        got = ours(ids, mask, flat).logits
        with_sizes = ours(ids, mask, padded, image_sizes=sizes).logits
    want = hf_forward(hf, ids, mask, flat).logits
    valid = mask.bool()
    assert (got - want)[valid].abs().max().item() <= 1e-5
    assert torch.equal(got[valid], with_sizes[valid])
    assert ours.image_sizes_of(ids, mask, flat, None).flatten().tolist() == [5, 3, 1]
    assert_greedy_matches_hf(ours, hf, ids, mask, flat, {"pixel_values": flat})


def test_placeholders_that_hold_no_tiling_are_refused(pair):
    """Without sizes the placeholders must spell whole tilings that the pixels hold; else one error naming both."""
    ours, _ = pair
    ids, mask, flat, _, _ = internvl_hf_batch(ours.config)
    with pytest.raises(ValueError, match=r"pixel_values hold 8"):
        ours(ids, mask, flat[:8])
    two_tiles = ids.clone()
    two_tiles[1, (two_tiles[1] == 3).nonzero()[-1].item() + 1] = 3  # the 1-tile image's </img> -> a placeholder: 17 of them
    with pytest.raises(ValueError, match=r"runs of image tokens hold \[80, 48, 17\].*1 or 3\.\.5 tiles"):
        ours(two_tiles, mask, flat)
    adjacent = ids.clone()
    adjacent[1, (adjacent[1] == 5).nonzero()[0].item()] = 3  # 3-tile image's </img> -> one run of 49 with what follows
    with pytest.raises(ValueError, match="one run per image"):
        ours(adjacent, mask, flat)


def test_loss_matches_hf(pair):
    ours, hf = pair
    ids, mask, pixels, sizes, flat = batch(ours.config)
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]  # the text after each image (its first token stays unsupervised)
    with torch.no_grad():
        got = ours(ids, mask, pixels, labels=labels, image_sizes=sizes).loss
        want = hf(input_ids=ids, attention_mask=mask, pixel_values=flat, labels=labels).loss
    assert abs(got.item() - want.item()) <= 1e-5


def test_greedy_generation_matches_hf(pair):
    ours, hf = pair
    ids, mask, pixels, sizes, flat = batch(ours.config, pad_left=[0, 2, 4], seed=1)
    assert_greedy_matches_hf(ours, hf, ids, mask, pixels, {"pixel_values": flat}, image_sizes=sizes)


def test_directories_transformers_writes_load_and_ours_round_trip(pair, tmp_path):
    ours, hf = pair
    hf.save_pretrained(tmp_path / "hf")
    loaded = MLLM.from_pretrained(tmp_path / "hf").eval()
    ids, mask, pixels, sizes, _ = batch(ours.config, pad_left=[0, 2, 1])
    with torch.no_grad():
        want = ours(ids, mask, pixels, logits="last", image_sizes=sizes).logits
    loaded.config.max_tiles = ours.config.max_tiles  # a preprocessing setting: transformers keeps it out of config.json
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask, pixels, logits="last", image_sizes=sizes).logits, want)
    loaded.save_pretrained(tmp_path / "again")
    again = MLLM.from_pretrained(tmp_path / "again").eval()
    assert again.family.name == "internvl" and again.config.max_tiles == 4
    assert again.config.hf_config().to_dict() == ours.config.hf_config().to_dict()
    with torch.no_grad():
        assert torch.equal(again(ids, mask, pixels, logits="last", image_sizes=sizes).logits, want)


@pytest.mark.parametrize("processor", [dict(max_patches=4), dict(max_patches=2), dict(max_patches=6, crop_to_patches=False)],
                         ids=["max_patches=4", "max_patches=2", "no-crop"])
def test_the_directorys_image_processor_sets_the_tiles(tmp_path, processor):
    """A directory with the preprocessor_config.json that transformers' GotOcr2ImageProcessorPil (InternVL's image
    processor) wrote: its max_patches (crop_to_patches false: one tile) is the model's most tiles and its mean / std
    normalise, so the tiles, pixels and placeholders of every image are that processor's, in MLLM.from_pretrained and
    in model.pretrained."""
    from PIL import Image
    from transformers import InternVLConfig

    from train.model_source import ModelSource

    InternVLForConditionalGeneration(InternVLConfig(**tiny_internvl_config().hf_config().to_dict())).save_pretrained(tmp_path)
    hf_processor = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, **{"crop_to_patches": True, **processor})
    hf_processor.save_pretrained(tmp_path)
    loaded = MLLM.from_pretrained(tmp_path)
    config = loaded.config
    assert config.max_tiles == (1 if processor.get("crop_to_patches") is False else processor["max_patches"])
    assert ModelSource(name="hf", pretrained=str(tmp_path)).mllm_config.max_tiles == config.max_tiles
    for image in [*internvl_images(), Image.new("RGB", (130, 20))]:
        want = hf_processor(images=[image], return_tensors="pt")
        assert config.tokens_per_image((image.height, image.width)) == int(want["num_patches"][0]) * 16
        assert torch.equal(config.model_family.image_processor(config)(image).pixels, want["pixel_values"])


def test_a_tied_hf_checkpoint_loads_tied(tmp_path):
    """InternVLConfig ties the LM head by its top-level flag (default True): a directory transformers
    writes without `lm_head` loads with the embedding as the head."""
    from transformers import InternVLConfig

    config = tiny_internvl_config()
    hf_config = InternVLConfig(**{**config.hf_config().to_dict(), "tie_word_embeddings": True})
    torch.manual_seed(1)
    hf = InternVLForConditionalGeneration(hf_config).eval()
    hf.save_pretrained(tmp_path)
    loaded = MLLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.language_model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, hf.lm_head.weight)


def test_the_data_path_writes_img_context_and_end_tokens(tmp_path, task_tokenizer):
    """The task tokenizer of an InternVL model has <img> = 4 and </img> = 5 after the fixed specials;
    ChatTokenizer writes <img> + the image's tokens + </img> (unsupervised) where <image> was; a
    tokenizer without them is refused by name."""
    from data.chat import IGNORE, TEMPLATES, ChatTokenizer
    from data.synthetic import all_texts
    from data.tokenizer import task_tokenizer as train_task_tokenizer

    tok = train_task_tokenizer(all_texts, TEMPLATES["vicuna"], "", 1024, tmp_path, ("<img>", "</img>"))
    assert [tok.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>", "<image>", "<img>", "</img>")] == [0, 1, 2, 3, 4, 5]
    chat = ChatTokenizer(tok, "vicuna", None, 512, system="", image_wrap=("<img>", "</img>"))
    conv = [{"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": "red"}]
    enc = chat.encode(conv, 1, image_tokens=[80])
    start = enc.input_ids.index(4)
    assert enc.input_ids[start : start + 82] == [4] + [3] * 80 + [5] and enc.input_ids.count(3) == 80
    assert all(label == IGNORE for label in enc.labels[start : start + 82])
    with pytest.raises(ValueError, match="lacks <img> / </img>"):
        ChatTokenizer(task_tokenizer, "vicuna", None, 512, system="", image_wrap=("<img>", "</img>"))


def test_presets_build_sincos_positions_and_the_8b_shapes():
    """`model=tiny_internvl` starts InternViT's patch positions (not its CLS row) from the 2-D sin-cos table;
    `model=internvl2_5_8b` has InternVL2.5-8B's 8.08B parameters (meta-device build)."""
    from omegaconf import OmegaConf

    from models.vision import sincos_2d
    from tests.test_configs import compose_train
    from train.model_source import ModelSource

    cfg = OmegaConf.to_container(compose_train(["model=tiny_internvl"]).model, resolve=True)
    cfg.pop("_target_")
    spec = ModelSource(**cfg)
    table = spec.build().vision_tower.embeddings.position_embeddings[0]
    config = spec.mllm_config
    assert torch.equal(table[1:], sincos_2d(config.grid_size, config.vision["hidden_size"])) and not bool(table[0].any())
    big = MLLMConfig.from_dict(OmegaConf.to_container(compose_train(["model=internvl2_5_8b"]).model.config, resolve=True))
    with torch.device("meta"):
        total = sum(p.numel() for p in MLLM.from_config(big).parameters())
    assert abs(total - 8.08e9) / 8.08e9 < 0.01, total
