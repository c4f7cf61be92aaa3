"""The data path for Qwen: each `<image>` becomes `<|vision_start|>` + one placeholder per token +
`<|vision_end|>` (unsupervised), images of different sizes concatenate their patches with their
grids stacked (transformers' `pixel_values` / `image_grid_thw`), and a batch built this way gives
the same logits in our model and in transformers' (`mm_token_type_ids` from the placeholders). A
tokenizer laid out like the Qwen checkpoints' (`<|image_pad|>` is the image token, no `<image>`) reads
the data's `<image>` as `<|image_pad|>`."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration

from data.batch import collate_images
from data.chat import IGNORE, ChatTokenizer, pad
from models import MLLM
from models.config import ConfigError
from tests.helpers import QWEN_TOKENS, qwen_images, qwen_word_tokenizer, tiny_qwen_config


def test_placeholders_sit_between_the_vision_ends_and_batches_match_transformers(tmp_path):
    torch.manual_seed(0)
    config = tiny_qwen_config()
    model = MLLM.from_config(config).eval()
    model.save_pretrained(tmp_path)
    hf = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    chat = ChatTokenizer(qwen_word_tokenizer(), "plain", None, 256, image_wrap=model.family.image_wrap)
    processor = model.family.image_processor(config)
    samples, rows, labels = [], [], []
    for image, answer in zip(qwen_images()[:2], ["w12", "w13"]):
        processed = processor(image)
        n = config.tokens_per_image(processed.size)
        conversation = [{"from": "human", "value": "<image>\nw10 w11"}, {"from": "gpt", "value": answer}]
        enc = chat.encode(conversation, n_images=1, image_tokens=[n])
        start = enc.input_ids.index(QWEN_TOKENS["vision_start_token_id"])
        assert enc.input_ids[start : start + n + 2] == [QWEN_TOKENS["vision_start_token_id"], *[3] * n, QWEN_TOKENS["vision_end_token_id"]]
        assert set(enc.labels[start : start + n + 2]) == {IGNORE} and chat.tok.convert_tokens_to_ids(answer) in enc.labels
        samples.append({"pixel_values": [processed.pixels], "image_sizes": [processed.size]})
        rows.append(enc.input_ids)
    pixels, grids = collate_images(samples)
    assert pixels.shape == (sum(int(g.prod()) for g in grids), 96) and grids.tolist() == [[1, 6, 10], [1, 10, 4]]
    ids = pad(rows, 0, left=True)
    mask = pad([[1] * len(r) for r in rows], 0, left=True)
    types = (ids == config.image_token_id).long() * mask
    with torch.no_grad():
        got = model(ids, mask, pixels, image_sizes=grids).logits
        want = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grids, mm_token_type_ids=types).logits
    assert (got - want)[mask.bool()].abs().max().item() <= 1e-5


def test_a_checkpoint_tokenizer_reads_image_as_its_own_image_token():
    from train.model_source import check_tokenizer

    config = tiny_qwen_config()
    tok = qwen_word_tokenizer("<|image_pad|>")
    check_tokenizer(tok, config)  # <|image_pad|> is the model's image token: accepted without <image>
    wrap = config.model_family.image_wrap
    chat = ChatTokenizer(tok, "plain", None, 256, image_wrap=wrap, image_token_id=3)
    conversation = [{"from": "human", "value": "<image>\nw10 w11"}, {"from": "gpt", "value": "w12"}]
    enc = chat.encode(conversation, 1, [2])
    assert enc.input_ids[enc.input_ids.index(4):][:4] == [4, 3, 3, 5]
    with_image = qwen_word_tokenizer("<|image_pad|>")
    with_image.add_special_tokens({"additional_special_tokens": ["<image>"]})  # what load_pretrained_tokenizer adds
    ids = ChatTokenizer(with_image, "plain", None, 256, image_wrap=wrap, image_token_id=3).encode(conversation, 1, [2]).input_ids
    assert with_image.convert_tokens_to_ids("<image>") not in ids and ids.count(3) == 2
    with pytest.raises(ConfigError, match="set them to the tokenizer's ids"):  # the config's vision ids must be the tokenizer's
        check_tokenizer(tok, tiny_qwen_config(token_ids={**QWEN_TOKENS, "vision_start_token_id": 6}))
    with pytest.raises(ValueError, match="has no <image> token"):  # without the model's id, <image> must be a token
        ChatTokenizer(tok, "plain", None, 256)
