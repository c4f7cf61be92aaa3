"""Length-grouped batches: one modality per batch, less padding than stream-order batches, and a stream
position that resumes exactly (mid-buffer, across epochs, with workers and corrupt samples)."""

import itertools
import json
import random
from dataclasses import asdict

import pytest
import torch
from torch.utils.data import DataLoader

from data.batch import Collator
from data.length_groups import LengthGrouping, padding_fraction
from data.pipeline import ShardStream
from data.stream_position import StreamPosition
from tests.test_resume import assert_continues_exactly, mixed_shards  # noqa: F401  (fixture: 3 shards of 11 samples, every 4th corrupt)


def fake_sample(i: int, length: int, image: bool) -> dict:
    return {"key": f"s{i}", "input_ids": [5] * length, "pixel_values": 1 if image else None}


def test_batches_keep_modalities_apart_and_pad_less():
    rng = random.Random(0)
    samples = [fake_sample(i, rng.randint(20, 600), image=rng.random() < 0.7) for i in range(8 * 16)]
    grouping = LengthGrouping(batch_size=8, buffer_batches=16)
    batches = grouping.batches(samples, random.Random(1))
    assert sorted(s["key"] for b in batches for s in b) == sorted(s["key"] for s in samples)  # each sample once
    assert all(len(b) == 8 for b in batches)  # a full buffer: the two parts' leftovers make one batch
    mixed = [b for b in batches if len({s["pixel_values"] is None for s in b}) > 1]
    assert len(mixed) <= 1
    stream_order = [[len(s["input_ids"]) for s in samples[i : i + 8]] for i in range(0, len(samples), 8)]
    grouped = [[len(s["input_ids"]) for s in b] for b in batches]
    assert padding_fraction(grouped) < 0.25 * padding_fraction(stream_order)
    assert grouping.batches(samples, random.Random(1)) == batches  # deterministic given the generator


def test_collator_counts_padding():
    batch = Collator(pad_id=0)([dict(fake_sample(i, n, False), labels=[1] * n, prompt_len=1, answer="", skill="all", n_skipped=0)
                                for i, n in enumerate([3, 5, 4])])
    assert batch.n_tokens == 15 and batch.n_padding == 3


def parse_with_length(raw: dict) -> dict:
    value = json.loads(raw["json"])["v"]  # raises on the corrupt members
    return {"key": raw["__key__"], "input_ids": [0] * (1 + (7 * value) % 11), "pixel_values": None if value % 3 == 0 else 1}


def collate(samples: list[dict]) -> dict:
    return {"keys": [s["key"] for s in samples], "n_skipped": sum(s["n_skipped"] for s in samples),
            "stream_pos": samples[-1]["stream_pos"]}


def grouped_batches(urls, workers: int, start: StreamPosition | None = None):
    grouping = LengthGrouping(batch_size=3, buffer_batches=4)
    ds = ShardStream(urls, parse_with_length, seed=5, shuffle_buffer=7, infinite=True, start=start, grouping=grouping)
    return iter(DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=collate))


@pytest.mark.parametrize("workers,consumed", [(0, 5), (0, 8), (2, 7), (2, 13)])
def test_grouped_stream_continues_exactly_from_a_position(mixed_shards, workers, consumed):  # noqa: F811
    position = assert_continues_exactly(lambda start: grouped_batches(mixed_shards, workers, start), workers, consumed, later=12)
    assert StreamPosition.from_tensor(position.to_tensor()) == position
    if workers == 0 and consumed == 5:
        assert position.taken[0] > 0  # the position lies inside a buffer: resuming rebuilds it and drops taken batches


def test_positions_written_before_grouping_still_load():
    old = StreamPosition.from_tensor(torch.tensor([[1, 7], [0, 2], [3, 9], [1, 3]]))
    assert old == StreamPosition(((1, 7), (0, 2), (3, 9)), 1) and old.taken == (0, 0, 0)


def test_data_module_logs_the_padding_fraction_of_grouped_batches(synthetic_dir, task_tokenizer):
    """`data.group_by_length=true` end to end through Lightning: data/padding_fraction is logged, equals the
    padded share of the batches trained on, and is below that of the same stream batched in order."""
    import lightning as L

    from data.chat import ChatTokenizer
    from data.datamodule import ImageSpec, MLLMDataModule, SampleEncoder
    from models.families.llava import PadToSquare
    from models.plan import Plan
    from tests.test_train import small_task_model_config
    from train.model_source import ModelSource
    from train.module import MLLMModule
    from train.optim import OptimConfig
    from train.stage import StageConfig

    root, _ = synthetic_dir
    config = small_task_model_config()
    encoder = SampleEncoder(ChatTokenizer(task_tokenizer, "vicuna", config.num_image_tokens, 512, system=""), ImageSpec(PadToSquare(64, (0.5,) * 3, (0.5,) * 3)))
    urls = sorted(str(p) for p in root.glob("train-*.tar")), sorted(str(p) for p in root.glob("val-*.tar"))

    def data(grouped: bool) -> MLLMDataModule:
        return MLLMDataModule(*urls, encoder, pad_id=0, batch_size=4, num_workers=0, shuffle_buffer=20,
                              group_by_length=grouped, group_buffer_batches=4)

    seen = []

    class Seen(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.append((batch.n_padding, batch.n_tokens))

    dm = data(True)
    module = MLLMModule(ModelSource(name="small", config=asdict(config)), Plan.dense(config.hf_text_config().num_hidden_layers),
                        None, optim=OptimConfig(lr=1e-3), stage=StageConfig("scratch", True, True, True))
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, callbacks=[Seen()], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    grouped = sum(p for p, _ in seen) / sum(t for _, t in seen)
    assert dm.padding_fraction == pytest.approx(grouped)
    assert float(trainer.callback_metrics["data/padding_fraction"]) == pytest.approx(grouped)
    in_order = data(False).train_dataloader()
    batches = list(itertools.islice(in_order, 16))
    ungrouped = sum(b.n_padding for b in batches) / sum(b.n_tokens for b in batches)
    print(f"padding fraction: grouped {grouped:.3f}, in stream order {ungrouped:.3f}")
    assert grouped < 0.5 * ungrouped
