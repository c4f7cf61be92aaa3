"""Sequence packing in the data path (data/packing.py): whole samples in rows of at most max_length tokens,
deterministic per buffer so the stream position resumes exactly; packed collation; packed training gives
the same per-sample losses as padded training on the same data; data.packing end to end through Lightning."""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict

import pytest
import torch
from torch.utils.data import DataLoader

from data.batch import Collator
from data.chat import IGNORE
from data.length_groups import padding_fraction
from data.packing import PACK_ROW, Packing, SampleTooLong
from data.pipeline import ShardStream
from data.stream_position import StreamPosition
from tests.test_length_groups import collate, fake_sample, parse_with_length
from tests.test_resume import assert_continues_exactly, mixed_shards  # noqa: F401  (fixture)


def test_rows_hold_whole_samples_within_the_limit():
    rng = random.Random(0)
    samples = [fake_sample(i, rng.choice([rng.randint(20, 80), rng.randint(300, 600)]), image=rng.random() < 0.7) for i in range(64)]
    packing = Packing(batch_size=3, max_length=700, buffer_samples=64)
    batches = packing.batches(samples, random.Random(1))
    assert sorted(s["key"] for b in batches for s in b) == sorted(s["key"] for s in samples)  # each sample once, whole
    rows = [[s for s in b if s[PACK_ROW] == k] for b in batches for k in range(3)]
    assert all(sum(len(s["input_ids"]) for s in r) <= 700 for r in rows)
    assert sorted(len({s[PACK_ROW] for s in b}) for b in batches)[1:] == [3] * (len(batches) - 1)  # full batches but one
    filled = sum(len(s["input_ids"]) for s in samples) / (sum(1 for r in rows if r) * 700)
    stream_order = [[len(s["input_ids"]) for s in samples[i : i + 3]] for i in range(0, len(samples), 3)]
    assert 1 - filled < 0.5 * padding_fraction(stream_order)  # even against rows of the full max_length
    keys = [[(s["key"], s[PACK_ROW]) for s in b] for b in batches]
    again = [[(s["key"], s[PACK_ROW]) for s in b] for b in packing.batches(samples, random.Random(1))]
    assert again == keys  # deterministic given the buffer and its generator


def test_an_over_long_sample_is_refused_by_name():
    with pytest.raises(SampleTooLong, match=r"'s1' has 30 tokens.*data.max_length=20"):
        Packing(batch_size=2, max_length=20).rows([fake_sample(0, 5, False), fake_sample(1, 30, True)])


def chat_sample(i: int, n: int, image: bool) -> dict:
    labels = [IGNORE] * (n // 2) + list(range(10, 10 + n - n // 2))
    return {"key": f"s{i}", "input_ids": list(range(4, 4 + n)), "labels": labels, "prompt_len": n // 2, "answer": "a",
            "skill": "all", "n_skipped": 0, "pixel_values": [torch.full((3, 2, 2), float(i))] if image else None,
            "image_sizes": [(2, 2)] if image else []}


def test_the_collator_lays_out_packed_rows():
    samples = [chat_sample(0, 6, True), chat_sample(1, 4, False), chat_sample(2, 5, True)]
    batch = Collator(pad_id=0)(Packing(batch_size=2, max_length=10).batches(samples, random.Random(0))[0])
    assert batch.size == 2 and batch.n_samples == 3
    assert batch.keys == ["s0", "s1", "s2"]  # row 0: the 6- and 4-token samples; row 1: the 5-token one
    assert batch.input_ids[0].tolist() == samples[0]["input_ids"] + samples[1]["input_ids"]
    assert batch.sample_index.tolist() == [[0] * 6 + [1] * 4, [0] * 10]  # padding continues the last sample
    assert batch.attention_mask[1].tolist() == [1] * 5 + [0] * 5
    assert batch.labels[0, 6].item() == IGNORE  # a sample's first label: nothing predicts across a boundary
    assert batch.n_tokens == 20 and batch.n_padding == 5
    assert batch.pixel_values[:, 0, 0, 0].tolist() == [0.0, 2.0]  # images in row order


def packed_batches(urls, workers: int, start: StreamPosition | None = None):
    packing = Packing(batch_size=2, max_length=14, buffer_samples=7)
    ds = ShardStream(urls, parse_with_length, seed=5, shuffle_buffer=7, infinite=True, start=start, grouping=packing)
    return iter(DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=collate))


@pytest.mark.parametrize("workers,consumed", [(0, 4), (0, 9), (2, 7)])
def test_packed_stream_continues_exactly_from_a_position(mixed_shards, workers, consumed):  # noqa: F811
    position = assert_continues_exactly(lambda start: packed_batches(mixed_shards, workers, start), workers, consumed, later=12)
    assert StreamPosition.from_tensor(position.to_tensor()) == position


def task_encoder(task_tokenizer):
    """The small task model's config and the encoder of the synthetic shards for it."""
    from data.chat import ChatTokenizer
    from data.datamodule import ImageSpec, SampleEncoder
    from models.families.llava import PadToSquare
    from tests.test_train import small_task_model_config

    config = small_task_model_config()
    encoder = SampleEncoder(ChatTokenizer(task_tokenizer, "vicuna", config.num_image_tokens, 512, system=""),
                            ImageSpec(PadToSquare(64, (0.5,) * 3, (0.5,) * 3)))
    return config, encoder


def encoded_samples(synthetic_dir, task_tokenizer, n: int) -> list[dict]:
    config, encoder = task_encoder(task_tokenizer)
    stream = ShardStream(sorted(str(p) for p in synthetic_dir[0].glob("train-*.tar")), encoder, seed=0, shuffle_buffer=50)
    return config, list(itertools.islice(iter(stream), n))


@pytest.mark.parametrize("arch", ["dense", "vica", "fastv"])
def test_packed_training_gives_the_same_per_sample_losses(synthetic_dir, task_tokenizer, arch):
    """The same samples, padded or packed, for 4 AdamW steps: every step's loss and the trained models'
    per-sample losses agree (the loss weighs every supervised token the same either way)."""
    from pathlib import Path

    import yaml

    from models import MLLM
    from models.methods import resolve_arch

    config, samples = encoded_samples(synthetic_dir, task_tokenizer, 24)
    text = config.hf_text_config()
    preset = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "arch" / f"{arch}.yaml").read_text())
    plan = resolve_arch(preset, text.num_hidden_layers, text.num_attention_heads, config.family)
    collate_ = Collator(pad_id=0)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(MLLM.from_config(config, plan).train())
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in models]
    packing = Packing(batch_size=6, max_length=512)
    for step in range(4):
        part = [dict(s) for s in samples[6 * step : 6 * step + 6]]
        padded = collate_(part)
        (packed,) = [collate_(b) for b in packing.batches([dict(s) for s in part], random.Random(step))]
        assert packed.size < padded.size  # several samples share a row
        losses = []
        for model, opt, batch in zip(models, optimizers, (padded, packed)):
            out = model(batch.input_ids, batch.attention_mask, labels=batch.labels, **batch.images, sample_index=batch.sample_index)
            loss = out.loss_sum / out.n_loss_tokens
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-5, (step, losses)
    with torch.no_grad():
        per_sample = [[float(m(b.input_ids, b.attention_mask, labels=b.labels, **b.images).loss) for b in map(collate_, ([s] for s in samples[:6]))]
                      for m in models]
    assert max(abs(a - b) for a, b in zip(*per_sample)) <= 1e-4


def test_data_module_packs_and_logs_samples_per_pack(synthetic_dir, task_tokenizer):
    """`data.packing=true` through Lightning: data/samples_per_pack > 1 and less padding than padded batches."""
    import lightning as L

    from data.datamodule import MLLMDataModule
    from models.plan import Plan
    from train.model_source import ModelSource
    from train.module import MLLMModule
    from train.optim import OptimConfig
    from train.stage import StageConfig

    config, encoder = task_encoder(task_tokenizer)
    root, _ = synthetic_dir
    urls = sorted(str(p) for p in root.glob("train-*.tar")), sorted(str(p) for p in root.glob("val-*.tar"))
    dm = MLLMDataModule(*urls, encoder, pad_id=0, batch_size=2, num_workers=0, shuffle_buffer=20, pack_buffer=12,
                        packing=True, max_length=400)
    module = MLLMModule(ModelSource(name="small", config=asdict(config)), Plan.dense(config.hf_text_config().num_hidden_layers),
                        None, optim=OptimConfig(lr=1e-3), stage=StageConfig("scratch", True, True, True))
    from train.callbacks import Throughput

    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, accumulate_grad_batches=2,
                        callbacks=[Throughput()],
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert float(trainer.callback_metrics["data/samples_per_pack"]) > 1.5
    assert dm.padding_fraction < 0.2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert float(trainer.callback_metrics["perf/tokens_per_s"]) > 0  # valid tokens (attention_mask), as unpacked


def test_flops_accounting_counts_each_packed_sample():
    """perf/mfu's token counts (train/callbacks.py): per packed sample, the same as for the sample in its own row."""
    from types import SimpleNamespace

    from tests.helpers import tiny_config
    from train.callbacks import sample_visual_tokens

    config = tiny_config()
    samples = []
    for i, (n_text, images) in enumerate([(6, 1), (9, 0), (5, 2)]):
        s = chat_sample(i, n_text, images > 0)
        s["input_ids"] = s["input_ids"][:3] + [config.image_token_id] * (images * config.num_image_tokens) + s["input_ids"][3:]
        s["labels"] = [IGNORE] * (len(s["input_ids"]) - len(s["labels"])) + s["labels"]
        samples.append(s)
    model = SimpleNamespace(config=config)
    padded = Collator(pad_id=0)([dict(s) for s in samples])
    packed = Collator(pad_id=0)(Packing(batch_size=2, max_length=80).batches([dict(s) for s in samples], random.Random(0))[0])
    assert packed.size == 1 and packed.n_samples == 3
    by_key = dict(zip(padded.keys, sample_visual_tokens(model, padded, prompts=False)))
    assert sample_visual_tokens(model, packed, prompts=False) == [by_key[k] for k in packed.keys]


def test_packing_settings_that_cannot_work_are_config_errors():
    from models.config import ConfigError
    from data.datamodule import DataConfig
    from train.model_source import ModelSource

    class Source:
        def prepare(self):
            raise AssertionError("never prepared")

    with pytest.raises(ConfigError, match="data.packing and data.group_by_length are alternatives"):
        DataConfig(source=Source(), packing=True, group_by_length=True)
    with pytest.raises(ConfigError, match="model.attention must be one of"):
        ModelSource(name="t", attention="flash")
