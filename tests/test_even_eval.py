"""Evaluation shares are equal across ranks (sharded strategies hang otherwise) and padding is never scored."""

import json

import pytest
import webdataset as wds

from data.batch import Collator
from data.even_eval import EvenEvalStream


def write_shards(tmp_path, n: int, per_shard: int) -> list[str]:
    """Real WebDataset shards on disk with `n` samples (the last shard shorter)."""
    urls = []
    for start in range(0, n, per_shard):
        path = tmp_path / f"val-{start // per_shard:06d}.tar"
        with wds.TarWriter(str(path)) as w:
            for i in range(start, min(n, start + per_shard)):
                w.write({"__key__": f"s{i:04d}", "json": json.dumps({"conversations": []})})
        urls.append(str(path))
    return urls


def keys_per_rank(urls, world: int, monkeypatch) -> list[list[dict]]:
    out = []
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        out.append(list(EvenEvalStream(urls, lambda raw: {"key": raw["__key__"]})))
    return out


@pytest.mark.parametrize("n,world", [(7, 2), (10, 3), (9, 3)])
def test_every_rank_gets_the_same_count_and_real_samples_once(tmp_path, monkeypatch, n, world):
    urls = write_shards(tmp_path, n, per_shard=4)
    shares = keys_per_rank(urls, world, monkeypatch)
    assert {len(s) for s in shares} == {-(-n // world)}
    real = [s["key"] for share in shares for s in share if not s.get("padding")]
    assert sorted(real) == [f"s{i:04d}" for i in range(n)]  # each sample scored exactly once


def test_padding_rows_are_unscored_and_unsupervised():
    sample = {"key": "k", "input_ids": [1, 2, 3], "labels": [-100, 2, 3], "prompt_len": 2, "answer": "a", "skill": "s", "pixel_values": None, "n_skipped": 0}
    batch = Collator(pad_id=0)([sample, {**sample, "padding": True}])
    assert batch.scored == [True, False]
    assert batch.labels[1].eq(-100).all() and not batch.labels[0].eq(-100).all()
