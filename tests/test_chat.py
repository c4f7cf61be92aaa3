"""Chat templates, `<image>` expansion and label masking on hand-checked examples."""

import pytest
import torch

from data.chat import IGNORE, ChatTokenizer, render, TEMPLATES
from data.validity import InvalidSample

CONV = [
    {"from": "human", "value": "<image>\nwhat color is the small dot ?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "is there a blue circle ?"},
    {"from": "gpt", "value": "no"},
]


def test_vicuna_rendering_matches_llava_v1():
    text, spans, last = render(TEMPLATES["vicuna"], "SYS", CONV)
    assert text == (
        "SYS USER: <image>\nwhat color is the small dot ? ASSISTANT: red</s>"
        "USER: is there a blue circle ? ASSISTANT: no</s>"
    )
    assert [text[a:b] for a, b in spans] == [" red</s>", " no</s>"]
    assert text[last:] == " no</s>"


def test_chatml_and_plain_rendering():
    text, spans, _ = render(TEMPLATES["chatml"], "S", CONV[:2])
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<image>\nwhat color is the small dot ?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
    assert [text[a:b] for a, b in spans] == ["red<|im_end|>\n"]
    text, spans, _ = render(TEMPLATES["plain"], "", CONV[:2])
    assert text == "<image>\nred\n"  # LLaVA stage 1: the question is dropped; a newline follows the image


def test_tokens_and_labels_hand_checked(task_tokenizer):
    chat = ChatTokenizer(task_tokenizer, "vicuna", num_image_tokens=4, max_length=100, system="")
    enc = chat.encode(CONV)
    tokens = task_tokenizer.convert_ids_to_tokens(enc.input_ids)
    assert tokens == (
        ["<s>", "USER", ":", "Ġ"] + ["<image>"] * 4
        + ["Ċ", "what", "Ġcolor", "Ġis", "Ġthe", "Ġsmall", "Ġdot", "Ġ?", "ĠASSISTANT", ":", "Ġred", "</s>"]
        + ["USER", ":", "Ġis", "Ġthere", "Ġa", "Ġblue", "Ġcircle", "Ġ?", "ĠASSISTANT", ":", "Ġno", "</s>"]
    )
    supervised = [t for t, lab in zip(tokens, enc.labels) if lab != IGNORE]
    assert supervised == ["Ġred", "</s>", "Ġno", "</s>"]
    assert all(lab in (IGNORE, tid) for tid, lab in zip(enc.input_ids, enc.labels))
    # the generation prompt ends right before the reply to the turn with the image (data/validity.py)
    assert tokens[enc.prompt_len - 2 : enc.prompt_len + 1] == ["ĠASSISTANT", ":", "Ġred"]
    assert enc.answer == "red" and not enc.truncated


def test_image_placeholder_count_checked(task_tokenizer):
    chat = ChatTokenizer(task_tokenizer, "vicuna", num_image_tokens=4, max_length=100, system="")
    with pytest.raises(InvalidSample, match="placeholder") as info:
        chat.encode(CONV, n_images=0)
    assert info.value.reason == "image_placeholder_mismatch"


def test_truncation_never_cuts_image_tokens(task_tokenizer):
    chat = ChatTokenizer(task_tokenizer, "vicuna", num_image_tokens=50, max_length=20, system="")
    with pytest.raises(InvalidSample, match="lose image tokens") as info:
        chat.encode(CONV)
    assert info.value.reason == "too_long"
    chat = ChatTokenizer(task_tokenizer, "vicuna", num_image_tokens=4, max_length=20, system="")
    enc = chat.encode(CONV)
    assert enc.truncated and len(enc.input_ids) == 20


def test_plain_template_samples_train(task_tokenizer):
    """The stage-1 template's samples go through the model's loss (which refuses a supervised token
    right after an image token) with only the caption supervised."""
    from models import MLLM
    from tests.test_train import small_task_model_config

    config = small_task_model_config()
    chat = ChatTokenizer(task_tokenizer, "plain", config.num_image_tokens, 512, system="")
    enc = chat.encode([{"from": "human", "value": "<image>\n<image>\ndescribe both"}, {"from": "gpt", "value": "red"}], n_images=2)
    assert task_tokenizer.decode([t for t in enc.labels if t != IGNORE]).strip() == "red"
    ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
    loss = MLLM.from_config(config)(ids, torch.ones_like(ids), torch.zeros(2, 3, 64, 64), labels=labels).loss
    assert torch.isfinite(loss)
