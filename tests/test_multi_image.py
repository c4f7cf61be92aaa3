"""Samples with several images on the data side: shard members, the encoder's pixel tensor and
placeholders, the collator's row order, models that take fewer images, and the model consuming the
batch (each image's tokens in its place)."""

import io
import json

import pytest
import torch
import webdataset as wds
from PIL import Image

from data.batch import Collator
from data.chat import ChatTokenizer
from models.families.llava import PadToSquare
from data.datamodule import ImageSpec, SampleEncoder
from data.members import image_members, member_names
from data.pipeline import ShardStream
from data.validity import InvalidSample
from models import MLLM
from tests.test_train import small_task_model_config

COLORS = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]


def png(rgb):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), rgb).save(buf, format="PNG")
    return buf.getvalue()


def record(n_images, question="which colors ?"):
    return {"conversations": [{"from": "human", "value": "<image>\n" * n_images + question}, {"from": "gpt", "value": "red"}]}


def raw(key, n_images, colors=COLORS, **extra):
    sample = {"__key__": key, "__url__": "mem.tar", "json": json.dumps(record(n_images)).encode()}
    names = member_names(["png"] * n_images)
    sample.update({name: png(colors[k % len(colors)]) for k, name in enumerate(names)})
    sample.update(extra)
    return sample


def encoder(tokenizer, n_v, max_images=None):
    chat = ChatTokenizer(tokenizer, "vicuna", num_image_tokens=n_v, max_length=1024, system="")
    return SampleEncoder(chat, ImageSpec(PadToSquare(64, (0.5,) * 3, (0.5,) * 3), max_images_per_sample=max_images))


def test_member_names_keep_single_image_shards_as_they_were():
    assert member_names(["jpg"]) == ["jpg"]
    assert member_names(["jpg", "png", "jpg"]) == ["0.jpg", "1.png", "2.jpg"]
    assert image_members({"json": b"", "jpg": b"a"}) == [b"a"]
    assert image_members({"json": b"", "10.png": b"k", **{f"{k}.jpg": bytes([k]) for k in range(10)}}) == [bytes([k]) for k in range(10)] + [b"k"]
    for bad in ({"0.jpg": b"a", "2.jpg": b"c"}, {"jpg": b"a", "0.png": b"b"}, {"jpg": b"a", "png": b"b"}):
        with pytest.raises(InvalidSample) as info:
            image_members(bad)
        assert info.value.reason == "bad_image_members"


def test_encoder_stacks_a_samples_images_in_placeholder_order(task_tokenizer):
    sample = encoder(task_tokenizer, n_v=4)(raw("k", 3))
    sample["pixel_values"] = torch.stack(sample["pixel_values"])  # one tensor per image, in placeholder order
    assert sample["pixel_values"].shape == (3, 3, 64, 64)
    # red, green, blue: each image's own channel is the bright one (normalised to +0.96)
    assert [int(sample["pixel_values"][k].mean((1, 2)).argmax()) for k in range(3)] == [0, 1, 2]
    assert sample["input_ids"].count(3) == 12 and sample["input_ids"][: sample["prompt_len"]].count(3) == 12


def test_models_that_take_fewer_images_skip_with_a_count(task_tokenizer):
    one = encoder(task_tokenizer, n_v=4, max_images=1)
    assert [tuple(p.shape) for p in one(raw("single", 1))["pixel_values"]] == [(3, 64, 64)]
    with pytest.raises(InvalidSample, match="at most 1") as info:
        one(raw("pair", 2))
    assert info.value.reason == "too_many_images"


def test_a_corrupt_image_among_several_is_named(task_tokenizer):
    sample = raw("k", 2)
    sample["1.png"] = b"not a png"
    with pytest.raises(InvalidSample, match="image 1 does not decode") as info:
        encoder(task_tokenizer, n_v=4)(sample)
    assert info.value.reason == "corrupt_image"


def test_collator_concatenates_images_in_row_order_and_sums_skips(task_tokenizer):
    enc = encoder(task_tokenizer, n_v=4)
    text_only = {"__key__": "t", "json": json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}).encode()}
    rows = [enc(raw("two", 2, colors=COLORS[1:])), enc(text_only), enc(raw("one", 1))]
    rows[0]["skipped"], rows[2]["skipped"] = {"bad_turn": 1}, {"bad_turn": 2, "corrupt_image": 1}
    for r in rows:
        r["n_skipped"] = sum(r.get("skipped", {}).values())
    batch = Collator(task_tokenizer.pad_token_id)(rows)
    assert batch.pixel_values.shape == (3, 3, 64, 64)
    assert [int(batch.pixel_values[k].mean((1, 2)).argmax()) for k in range(3)] == [1, 2, 0]  # row 0's two, then row 2's
    assert (batch.input_ids == 3).sum(1).tolist() == [8, 0, 4]
    assert batch.skipped == {"bad_turn": 3, "corrupt_image": 1} and batch.n_skipped == 4


def test_the_model_reads_each_image_in_its_place(task_tokenizer):
    """A batch of multi-image, single-image and text-only rows trains (finite loss, gradients) and
    generates; a row's second image changes its prediction, another row's does not."""
    config = small_task_model_config()
    torch.manual_seed(0)
    model = MLLM.from_config(config)
    enc = encoder(task_tokenizer, n_v=config.num_image_tokens)
    text_only = {"__key__": "t", "json": json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}).encode()}
    collate = Collator(task_tokenizer.pad_token_id)
    batch = collate([enc(raw("two", 2)), enc(raw("one", 1)), enc(text_only)])
    out = model(batch.input_ids, batch.attention_mask, batch.pixel_values, labels=batch.labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and next(model.multi_modal_projector.parameters()).grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        logits = model(batch.prompt_ids, batch.prompt_mask, batch.pixel_values, logits="last").logits
        changed = batch.pixel_values.clone()
        changed[1] = -changed[1]  # row 0's second image
        other = model(batch.prompt_ids, batch.prompt_mask, changed, logits="last").logits
    assert not torch.allclose(logits[0], other[0]) and torch.allclose(logits[1:], other[1:], atol=1e-5)


def test_stream_skips_multi_image_samples_a_model_cannot_take(tmp_path, task_tokenizer):
    path = str(tmp_path / "mixed-000000.tar")
    with wds.TarWriter(path) as w:
        for key, n in (("a", 1), ("b", 2), ("c", 3), ("d", 1)):
            w.write({k: v for k, v in raw(key, n).items() if k != "__url__"})
    samples = list(ShardStream([path], encoder(task_tokenizer, n_v=4, max_images=1)))
    assert [s["key"] for s in samples] == ["a", "d"]
    assert samples[-1]["skipped"] == {"too_many_images": 2} and sum(s["n_skipped"] for s in samples) == 2
    every = list(ShardStream([path], encoder(task_tokenizer, n_v=4)))
    assert [len(s["pixel_values"]) for s in every] == [1, 2, 3, 1]
