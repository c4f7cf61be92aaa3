"""Bad input fails with a message that names the problem and the fix."""

import json

import pytest
import torch

from models import MLLM, ImageTokenMismatch
from tests.helpers import image_batch, tiny_model
from train.model_source import ModelSource, check_tokenizer


def test_image_token_count_mismatch():
    model = tiny_model()
    ids, mask, pixels = image_batch(model.config, batch=2)
    with pytest.raises(ImageTokenMismatch, match=r"per row \[16, 16\] do not match the 3 image\(s\), which give \[16, 16, 16\]"):
        model(ids, mask, torch.cat([pixels, pixels[:1]]))
    ids[0, 3] = 5  # one placeholder short in row 0
    with pytest.raises(ImageTokenMismatch, match=r"\[15, 16\].*each image needs exactly its count of consecutive <image> tokens"):
        model(ids, mask, pixels)
    with pytest.raises(ImageTokenMismatch):
        model(ids, mask, None)


def test_text_only_batch_needs_no_image():
    model = tiny_model()
    ids = torch.randint(4, 100, (2, 7))
    assert model(ids).logits.shape == (2, 7, 128)


def test_missing_checkpoint_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a checkpoint directory"):
        MLLM.from_pretrained(tmp_path / "nope")
    spec = ModelSource(name="x", pretrained=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        spec.mllm_config


def test_checkpoint_that_does_not_fit(tmp_path):
    tiny_model().save_pretrained(tmp_path / "a")
    other = tiny_model(text="qwen2")  # qwen2 adds q/k/v biases
    from models.checkpoint import load_weights, read_state_dict

    with pytest.raises(ValueError, match="missing .*bias"):
        load_weights(other, read_state_dict(tmp_path / "a"), "a")


def test_checkpoint_with_wrong_shapes_fails_before_reading_tensors(tmp_path):
    tiny_model().save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96  # the weights on disk are 128 wide
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"wrong shape .*mlp\.\w+_proj\.weight \[128, 64\] vs \[96, 64\]"):
        MLLM.from_pretrained(tmp_path / "a")


def test_supervising_the_token_after_an_image_is_refused():
    model = tiny_model()
    ids, mask, pixels = image_batch(model.config, batch=1)
    labels = ids.clone()  # supervises everything, including the token right after the image
    with pytest.raises(ValueError, match="directly follows an <image> token"):
        model(ids, mask, pixels, labels=labels)


def test_tokenizer_model_mismatch(task_tokenizer):
    from tests.helpers import tiny_config

    with pytest.raises(Exception, match="raise model.config.text.vocab_size"):
        check_tokenizer(task_tokenizer, tiny_config())  # 128-token model, ~1000-token tokenizer
