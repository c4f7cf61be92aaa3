"""A malformed sample anywhere in real shards on disk (tokenizer corpus, training stream, evaluation
stream) is skipped, logged with its shard and key (once: not again every epoch or evaluation), and
counted in data/skipped_samples and data/skipped_samples/<reason>."""

import io
import json
import logging
from dataclasses import asdict

import lightning as L
import pytest
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from data.chat import ChatTokenizer
from data.batch import Collator
from models.families.llava import PadToSquare
from data.datamodule import EvalLoader, ImageSpec, SampleEncoder
from data.skips import SkipLog
from data.validity import InvalidSample
from data.even_eval import EvenEvalStream
from data.pipeline import ShardStream
from data.sources import ShardSource
from models.plan import Plan
from tests.test_train import small_task_model_config
from train.evaluation import EvalConfig
from train.model_source import ModelSource
from train.module import MLLMModule
from train.optim import OptimConfig
from train.stage import StageConfig

TURNS = [{"from": "human", "value": "<image>\nwhat color is the small dot ?"}, {"from": "gpt", "value": "red"}]
BAD = {  # key: the JSON member of a sample that is no LLaVA record
    "bad_json": b'{"conversations": [oops',
    "not_utf8": b"\xff\xfe{}",
    "a_list": json.dumps(TURNS).encode(),
    "no_conversations": json.dumps({"id": "x"}).encode(),
    "no_value": json.dumps({"conversations": [{"from": "human"}, {"from": "gpt", "value": "red"}]}).encode(),
}


def png():
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path, keys):
    """Good samples and the BAD ones, in the order of `keys`."""
    with wds.TarWriter(str(path)) as w:
        for key in keys:
            w.write({"__key__": key, "png": png(), "json": BAD.get(key, json.dumps({"conversations": TURNS}).encode())})
    return str(path)


def encoder(tokenizer):
    chat = ChatTokenizer(tokenizer, "vicuna", num_image_tokens=64, max_length=512, system="")
    return SampleEncoder(chat, ImageSpec(PadToSquare(64, (0.5,) * 3, (0.5,) * 3)))


def skip_logs(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_tokenizer_corpus_skips_and_logs_malformed_samples(tmp_path, caplog):
    shard = write_shard(tmp_path / "train-000000.tar", ["a", "bad_json", "b", "no_value"])
    shards = ShardSource(train=shard, val=shard).prepare()
    with caplog.at_level(logging.WARNING):
        texts = shards.texts()
    assert texts == [t["value"] for t in TURNS] * 2
    logs = skip_logs(caplog)
    for key in ("bad_json", "no_value"):
        assert any(key in m and shard in m for m in logs), logs
    assert any("skipped 2 bad sample(s)" in m for m in logs), logs


def test_training_stream_skips_logs_and_counts_every_malformed_case(tmp_path, task_tokenizer, caplog):
    shard = write_shard(tmp_path / "train-000000.tar", ["a", *BAD, "b"])
    with caplog.at_level(logging.WARNING):
        samples = list(zip(range(4), ShardStream([shard], encoder(task_tokenizer), infinite=True)))
    assert [s["key"] for _, s in samples] == ["a", "b", "a", "b"]
    assert [s["n_skipped"] for _, s in samples] == [0, len(BAD), 0, len(BAD)]  # every epoch counts them again
    logs = skip_logs(caplog)
    for key in BAD:
        assert any(repr(key) in m and shard in m for m in logs), (key, logs)
    assert any("malformed JSON" in m for m in logs) and any("'value'" in m for m in logs)


@pytest.mark.parametrize("stream", [ShardStream, EvenEvalStream])
def test_evaluation_stream_counts_bad_samples_after_the_last_good_one(tmp_path, task_tokenizer, stream):
    """Nothing follows a finite stream's last bad samples: the last good sample carries their count.
    (EvenEvalStream pads its share to the raw sample count with unscored copies, as other ranks may
    have no bad samples.)"""
    shard = write_shard(tmp_path / "val-000000.tar", ["a", "bad_json", "b", "no_conversations", "a_list"])
    samples = list(stream([shard], encoder(task_tokenizer)))
    assert [s["key"] for s in samples if not s.get("padding")] == ["a", "b"]
    assert sum(s["n_skipped"] for s in samples) == 3


def test_validation_counts_skipped_samples_in_data_skipped_samples(tmp_path, task_tokenizer):
    shards = [write_shard(tmp_path / "val-000000.tar", ["a", "bad_json", "b"]),
              write_shard(tmp_path / "val-000001.tar", ["no_value", "a", "not_utf8"])]
    config = small_task_model_config()
    chat = ChatTokenizer(task_tokenizer, "vicuna", config.num_image_tokens, 512, system="")
    loader = DataLoader(ShardStream(shards, SampleEncoder(chat, ImageSpec(PadToSquare(64, (0.5,) * 3, (0.5,) * 3)))), batch_size=2,
                        collate_fn=Collator(task_tokenizer.pad_token_id))
    module = MLLMModule(
        ModelSource(name="small", config=asdict(config), system_prompt=""), Plan.dense(config.hf_text_config().num_hidden_layers),
        task_tokenizer, optim=OptimConfig(), stage=StageConfig("scratch", True, True, True),
        evaluation=EvalConfig(max_new_tokens=1, noimage=False),
    )
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, dataloaders=loader, verbose=False)
    metrics = trainer.callback_metrics
    assert metrics["data/skipped_samples"] == 3
    assert (metrics["data/skipped_samples/malformed_json"], metrics["data/skipped_samples/bad_turn"]) == (2, 1)
    assert not any(k.startswith("data/skipped_samples/") for k in metrics if k.split("/")[-1] not in ("malformed_json", "bad_turn"))


def test_a_bad_sample_is_logged_once_per_reader_however_many_epochs(tmp_path, task_tokenizer, caplog):
    """The issue's repeated warning: an infinite stream meets its bad sample every epoch; it is
    counted every time and logged the first time."""
    shard = write_shard(tmp_path / "train-000000.tar", ["a", "no_value", "b"])
    with caplog.at_level(logging.WARNING):
        samples = [s for _, s in zip(range(8), ShardStream([shard], encoder(task_tokenizer), infinite=True))]
    assert sum(s["n_skipped"] for s in samples) == 4 and samples[1]["skipped"] == {"bad_turn": 1}
    assert sum("'no_value'" in m for m in skip_logs(caplog)) == 1


def test_warnings_stop_after_a_few_per_reason_and_say_so(caplog):
    skips = SkipLog("data", per_reason=2)
    with caplog.at_level(logging.WARNING):
        for k in range(5):
            skips.skip(f"sample {k}", InvalidSample("bad_turn", "turn 0 is not an object"))
        skips.skip("sample x", InvalidSample("corrupt_image", "image 0 does not decode"))
        skips.skip("sample y", KeyError("surprise"))
    logs = skip_logs(caplog)
    assert [m for m in logs if "bad_turn" in m and "skipping" in m] == [
        "data: skipping sample sample 0 (bad_turn): turn 0 is not an object", "data: skipping sample sample 1 (bad_turn): turn 0 is not an object"]
    assert sum("further bad_turn samples are counted" in m for m in logs) == 1
    assert any("sample y (other): KeyError" in m for m in logs)
    assert skips.total == {"bad_turn": 5, "corrupt_image": 1, "other": 1} and skips.take() == dict(skips.total) and not skips.take()


def test_an_evaluation_set_logs_its_bad_samples_on_the_first_full_pass_only(tmp_path, task_tokenizer):
    """Every evaluation reads the set again in new worker processes: the counts repeat, the log does not.
    (The worker's log goes to a file: caplog does not see other processes.)"""
    shard = write_shard(tmp_path / "val-000000.tar", ["a", "bad_json", "b", "no_value"])
    stream = ShardStream([shard], encoder(task_tokenizer))
    loader = EvalLoader(stream, batch_size=2, num_workers=1, collate_fn=Collator(task_tokenizer.pad_token_id))
    handler = logging.FileHandler(tmp_path / "worker.log")
    handler.setLevel(logging.WARNING)
    pipeline_log = logging.getLogger("data.pipeline")
    pipeline_log.addHandler(handler)
    try:
        lines, counts = [], []
        for _ in range(3):
            counts.append([b.skipped for b in loader])
            handler.flush()
            lines.append(len((tmp_path / "worker.log").read_text().splitlines()))
    finally:
        pipeline_log.removeHandler(handler)
        handler.close()
    assert counts[0] == counts[1] == counts[2] and sum(sum(c.values()) for c in counts[0]) == 2
    assert lines[0] == 2 and lines[1] == lines[2] == 2  # nothing new after the first full pass
