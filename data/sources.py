"""Where shards come from: the embedded synthetic task (generated and cached) or existing shards.

Each source is selected by `_target_` in `conf/data/*.yaml` and answers `prepare() -> Shards`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import webdataset as wds

from .pipeline import expand_urls, parse_record, sample_name

log = logging.getLogger(__name__)
MAX_LOGGED_SKIPS = 20


@dataclass
class Shards:
    train: list[str]
    val: list[str]
    texts: Callable[[], list[str]]  # text to train a tokenizer on, when the model needs one
    skills: list[str] | None = None


class SyntheticSource:
    """The shapes VQA task of `data.synthetic`, generated once per config in its own directory
    below the cache directory `root` (`synthetic-s<seed>-<hash of the config>`)."""

    def __init__(self, root: str, **synthetic):
        from .synthetic import SyntheticConfig, cache_dir

        self.cfg = SyntheticConfig(**synthetic)
        self.dir = cache_dir(root, self.cfg)

    def prepare(self) -> Shards:
        from .synthetic import all_texts, ensure_generated

        meta = ensure_generated(self.dir, self.cfg)
        splits = meta["splits"]
        return Shards(
            train=[str(self.dir / s) for s in splits["train"]["shards"]],
            val=[str(self.dir / s) for s in splits["val"]["shards"]],
            texts=lambda: all_texts(self.cfg),
            skills=list(meta["skills"]),
        )


class ShardSource:
    """Existing LLaVA-format shards (e.g. written by `python -m data.convert_llava`)."""

    def __init__(self, train: str | list[str], val: str | list[str], tokenizer_samples: int = 2000):
        self.train, self.val = train, val
        self.tokenizer_samples = tokenizer_samples

    def prepare(self) -> Shards:
        train, val = expand_urls(self.train), expand_urls(self.val)
        missing = [u for u in train + val if "://" not in u and not Path(u).exists()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) not found, e.g. {missing[:3]}; check data.source.train/val")
        return Shards(train=train, val=val, texts=lambda: self._texts(train))

    def _texts(self, urls: list[str]) -> list[str]:
        """Conversation text of the first `tokenizer_samples` records; bad samples are skipped and logged."""
        out, skipped = [], 0

        def skip(where: str, err: Exception) -> bool:
            nonlocal skipped
            skipped += 1
            if skipped <= MAX_LOGGED_SKIPS:
                log.warning("tokenizer corpus: skipping sample %s: %s: %s", where, type(err).__name__, err)
            return True  # webdataset handler protocol: continue

        for sample in wds.tarfile_samples(({"url": u} for u in urls), handler=lambda e: skip("(unreadable tar member)", e)):
            try:
                record, _ = parse_record(sample)
            except ValueError as e:
                skip(sample_name(sample), e)
                continue
            out.extend(t["value"] for t in record["conversations"])
            if len(out) >= self.tokenizer_samples:
                break
        if skipped:
            log.warning("tokenizer corpus: skipped %d bad sample(s) in %d shard(s)", skipped, len(urls))
        return out
