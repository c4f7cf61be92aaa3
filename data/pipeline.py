"""Reading LLaVA-format WebDataset shards: deterministic order, rank/worker splitting, skip-and-count.

Order is a pure function of (seed, epoch, rank, world size, worker): shards are shuffled per epoch,
split across ranks and dataloader workers (whole shards when there are enough of them, otherwise
every k-th sample), then shuffled through a seeded buffer. Corrupt tar members or undecodable
samples (broken image, malformed JSON, a record data/validity.py rejects) are skipped and counted by reason,
and logged with their shard and key without repeating (data/skips.py); each yielded sample carries the
skips before it (`skipped`, by reason, and their sum `n_skipped`; in a finite stream the last sample
also carries those after it) so the training process can count and log them exactly
(`data/skipped_samples/<reason>`), whichever worker saw them, and where it was read (`stream_pos`), so a
resumed run continues exactly where the checkpoint left off (`start`, data/stream_position.py).
With `grouping` the stream yields whole batches of similar length instead (data/length_groups.py).
"""

from __future__ import annotations

import json
import logging
import os
import random
from itertools import islice
from typing import Callable, Iterator, NamedTuple

import torch.distributed as dist
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from .frames import FRAMES_MEMBER
from .length_groups import LengthGrouping
from .members import image_members
from .skips import SkipLog
from .stream_position import StreamPosition
from .validity import Conversation, InvalidSample, check_record

log = logging.getLogger(__name__)


def expand_urls(spec: str | list[str]) -> list[str]:
    """Brace patterns (`train-{000000..000009}.tar`) or lists, as webdataset writes them."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls = [u for s in specs for u in wds.shardlists.expand_urls(s)]
    if not urls:
        raise ValueError(f"no shards match {spec!r}")
    return urls


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardStream(IterableDataset):
    """Samples from shards, transformed by `transform(raw) -> dict` (which may raise to skip a sample).

    `start` continues a stream that this rank already read up to there: each reader skips the raw samples
    it had drawn (read from the tar, never decoded), and worker w plays reader (w + start.next_reader), so
    the loader's round-robin hands out the batch that was next. With `grouping` each reader yields lists
    of samples (batches; use a DataLoader with batch_size=None) formed per buffer.

    Skipped samples are counted by reason and logged once per reader (data/skips.py); `quiet_skips`
    counts without logging (data.datamodule.EvalLoader sets it for an evaluation set already read).
    """

    def __init__(
        self,
        urls: list[str],
        transform: Callable[[dict], dict],
        seed: int = 0,
        shuffle_buffer: int = 0,
        infinite: bool = False,
        max_logged_errors: int = 5,  # samples logged per reason (data/skips.py)
        start: StreamPosition | None = None,
        grouping: LengthGrouping | None = None,
    ):
        self.urls = list(urls)
        self.grouping = grouping
        self.start = start
        self.transform = transform
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.infinite = infinite
        self.skips = SkipLog("data", per_reason=max_logged_errors, logger=log)
        self.quiet_skips = False

    def _skip_member(self, err: Exception) -> bool:
        """webdataset's handler for tar members it cannot read (a truncated or damaged shard)."""
        self.skips.skip(f"(unreadable tar member: {err})", err, reason="unreadable_tar_member")
        return True  # webdataset handler protocol: continue

    def _reader(self) -> tuple[int, int]:
        """(this worker's reader index, readers per rank)."""
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        if self.start is None:
            return wid, nw
        if self.start.n_readers != nw:
            raise ValueError(
                f"stream position has {self.start.n_readers} reader(s) but the loader has {nw}: "
                "resume with the data.num_workers the checkpoint was written with"
            )
        return (wid + self.start.next_reader) % nw, nw

    def _slots(self) -> tuple[int, int]:
        rank, world = rank_and_world()
        reader, nw = self._reader()
        return rank * nw + reader, world * nw

    def _raw(self, epoch: int) -> Iterator[dict]:
        slot, n_slots = self._slots()
        shards = list(self.urls)
        if self.shuffle_buffer:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(shards)
        by_shard = len(shards) >= n_slots
        if by_shard:
            shards = shards[slot::n_slots]
        samples = self._tar_samples(shards)
        for i, sample in enumerate(samples):
            if by_shard or i % n_slots == slot:
                yield sample

    def _tar_samples(self, shards: list[str]) -> Iterator[dict]:
        """Raw samples of `shards` in order; unreadable tar members are skipped and counted."""
        return wds.tarfile_samples(({"url": u} for u in shards), handler=self._skip_member)

    def _shuffled(self, it: Iterator[dict], epoch: int) -> Iterator[dict]:
        if not self.shuffle_buffer:
            yield from it
            return
        slot, _ = self._slots()
        rng = random.Random(hash((self.seed, epoch, slot)))
        buf: list[dict] = []
        for s in it:
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[dict] | Iterator[list[dict]]:
        self.skips.quiet = self.quiet_skips
        reader, _ = self._reader()
        epoch, skip = self.start.positions[reader] if self.start else (0, 0)
        samples = self._samples(reader, epoch, skip)
        if not self.infinite:
            samples = self._counting_trailing_skips(samples)
        if self.grouping is None:
            return samples
        return self._grouped(samples, reader, (epoch, skip), self.start.taken[reader] if self.start else 0)

    def _counting_trailing_skips(self, samples: Iterator[dict]) -> Iterator[dict]:
        """A finite stream holds its newest sample back, so the last one it yields also carries the
        samples skipped after it (an evaluation set's bad last sample is counted too)."""
        last = None
        for sample in samples:
            if last is not None:
                yield last
            last = sample
        if last is not None:
            _carry(last, self.skips.take())
            yield last
        elif self.skips.pending:
            log.warning("all %d sample(s) of %d shard(s) were skipped (e.g. %s): %s", sum(self.skips.pending.values()),
                        len(self.urls), self.urls[0], self.skips.summary())

    def _grouped(self, samples: Iterator[dict], reader: int, before: tuple[int, int], taken: int) -> Iterator[list[dict]]:
        """Batches of one buffer at a time. Each batch's `stream_pos` is (reader, epoch, drawn, taken): the
        raw position before its buffer and the batches of that buffer consumed with it; the last batch of
        a buffer points past the buffer instead. Resuming rebuilds the buffer and drops the taken batches."""
        slot, _ = self._slots()
        while True:
            buffer = list(islice(samples, self.grouping.buffer_size))
            if not buffer:
                return
            batches = self.grouping.batches(buffer, random.Random(hash((self.seed, slot, *before))))
            after = tuple(buffer[-1]["stream_pos"][1:])
            for k, batch in enumerate(batches[taken:], start=taken + 1):
                pos = (reader, *after, 0) if k == len(batches) else (reader, *before, k)
                for sample in batch:
                    sample["stream_pos"] = pos
                yield batch
            before, taken = after, 0

    def _samples(self, reader: int, epoch: int, skip: int) -> Iterator[dict]:
        while True:
            produced, drawn = 0, 0
            for raw in self._shuffled(self._raw(epoch), epoch):
                drawn += 1
                if drawn <= skip:  # trained on before the checkpoint (its corrupt samples were counted then)
                    if drawn == skip:
                        self.skips.take()
                    continue
                try:
                    sample = self.transform(raw)
                except Exception as e:  # a record data/validity.py rejects, a corrupt image, ...: skip and count
                    self.skips.skip(sample_name(raw), e)
                    continue
                sample["skipped"], sample["n_skipped"] = {}, 0
                _carry(sample, self.skips.take())
                sample["stream_pos"] = (reader, epoch, drawn)
                produced += 1
                yield sample
            if not self.infinite:
                return
            if produced == 0 and not skip:  # (a resumed epoch may legitimately have nothing left)
                raise RuntimeError(f"no usable samples in {len(self.urls)} shard(s) (e.g. {self.urls[0]}); all were corrupt or empty")
            epoch, skip = epoch + 1, 0


def sample_name(raw: dict) -> str:
    """Where a raw sample came from, for the log: its key and shard."""
    return f"{raw.get('__key__', '?')!r} of {raw.get('__url__', '?')}"


class ParsedSample(NamedTuple):
    record: dict  # the JSON record as written
    images: list[bytes]  # encoded image bytes in placeholder order ([] for text-only samples)
    conversation: Conversation  # the record's conversation, checked by data/validity.py
    has_video: bool = False  # the sample holds a video's frames (data/frames.py: read them with read_frames)


def parse_record(raw: dict) -> ParsedSample:
    """The record, image bytes and checked conversation of a raw shard sample (a video's frames are
    not loaded here).

    Raises InvalidSample (data/validity.py) naming what is wrong: malformed JSON, or a record the
    validity rule rejects for the images (or video) this sample holds."""
    if "json" not in raw:
        raise InvalidSample("malformed_json", "sample has no .json member")
    try:
        record = json.loads(raw["json"])
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise InvalidSample("malformed_json", f"malformed JSON ({e})") from None
    images = image_members(raw)
    has_video = FRAMES_MEMBER in raw
    if has_video and (images or not isinstance(record, dict) or record.get("video") is None):
        raise InvalidSample("bad_video_frames", f"{FRAMES_MEMBER} beside {len(images)} image(s) and video "
                            f"{record.get('video') if isinstance(record, dict) else None!r}: a video sample holds its frames only")
    return ParsedSample(record, images, check_record(record, len(images) + has_video), has_video)


def _carry(sample: dict, skipped: dict[str, int]) -> None:
    """Add skip counts (by reason) to those `sample` carries."""
    merged = dict(sample.get("skipped") or {})
    for reason, n in skipped.items():
        merged[reason] = merged.get(reason, 0) + n
    sample["skipped"], sample["n_skipped"] = merged, sum(merged.values())
