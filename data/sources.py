"""Where shards come from: the embedded synthetic task (generated and cached) or existing shards.

Each source is selected by `_target_` in `conf/data/*.yaml` and answers `prepare() -> Shards` and
`image_sizes()` (what its images measure, when that is known before reading them: the job checks that
their visual tokens fit `data.max_length` before any data work).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import webdataset as wds

from .pipeline import expand_urls, parse_record, sample_name
from .skips import SkipLog
from .validity import InvalidSample

log = logging.getLogger(__name__)
MAX_LOGGED_SKIPS = 5  # per reason


@dataclass
class Shards:
    train: list[str]
    val: list[str]
    texts: Callable[[], list[str]]  # text to train a tokenizer on, when the model needs one
    skills: list[str] | None = None
    videos: bool = False  # the shards hold videos (a trained tokenizer then gets the family's video token)


class SyntheticSource:
    """The shapes VQA task of `data.synthetic`, generated once per config in its own directory
    below the cache directory `root` (`synthetic-s<seed>-<hash of the config>`)."""

    def __init__(self, root: str, **synthetic):
        from .synthetic import SyntheticConfig, cache_dir

        self.cfg = SyntheticConfig(**synthetic)
        self.dir = cache_dir(root, self.cfg)

    def image_sizes(self) -> list[tuple[int, int]]:
        """The (height, width) of every image the task holds."""
        return self.cfg.image_sizes

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


class SyntheticVideoSource:
    """The synthetic temporal task of `data.synthetic_video`, generated once per config in its own
    directory below the cache directory `root` (`synthetic-video-s<seed>-<hash of the config>`)."""

    def __init__(self, root: str, **task):
        from .synthetic_video import VideoTaskConfig, cache_dir

        self.cfg = VideoTaskConfig(**task)
        self.dir = cache_dir(root, self.cfg)

    def image_sizes(self) -> None:
        """It holds videos, no images."""
        return None

    def prepare(self) -> Shards:
        from .synthetic_video import all_texts, ensure_generated

        meta = ensure_generated(self.dir, self.cfg)
        splits = meta["splits"]
        return Shards(train=[str(self.dir / s) for s in splits["train"]["shards"]],
                      val=[str(self.dir / s) for s in splits["val"]["shards"]],
                      texts=lambda: all_texts(self.cfg), skills=list(meta["skills"]), videos=True)


class ShardSource:
    """Existing LLaVA-format shards (e.g. written by `python -m data.convert_llava`)."""

    def __init__(self, train: str | list[str], val: str | list[str], tokenizer_samples: int = 2000):
        self.train, self.val = train, val
        self.tokenizer_samples = tokenizer_samples

    def image_sizes(self) -> None:
        """Unknown before the shards are read."""
        return None

    def prepare(self) -> Shards:
        train, val = expand_urls(self.train), expand_urls(self.val)
        missing = [u for u in train + val if "://" not in u and not Path(u).exists()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) not found, e.g. {missing[:3]}; check data.source.train/val")
        return Shards(train=train, val=val, texts=lambda: self._texts(train))

    def _texts(self, urls: list[str]) -> list[str]:
        """Conversation text of the first `tokenizer_samples` usable records (data/validity.py, as in
        training); the others are skipped, counted by reason and logged (data/skips.py)."""
        out, skips = [], SkipLog("tokenizer corpus", per_reason=MAX_LOGGED_SKIPS, logger=log)

        def skip_member(err: Exception) -> bool:
            skips.skip(f"(unreadable tar member: {err})", err, reason="unreadable_tar_member")
            return True  # webdataset handler protocol: continue

        for sample in wds.tarfile_samples(({"url": u} for u in urls), handler=skip_member):
            try:
                parsed = parse_record(sample)
            except InvalidSample as e:
                skips.skip(sample_name(sample), e)
                continue
            out.extend(text for _, text in parsed.conversation.turns)
            if parsed.conversation.system:
                out.append(parsed.conversation.system)
            if len(out) >= self.tokenizer_samples:
                break
        if skips.total:
            log.warning("tokenizer corpus: skipped %d bad sample(s) in %d shard(s) (%s)", skips.n_total, len(urls), skips.summary())
        return out
