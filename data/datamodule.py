"""LightningDataModule over LLaVA-format shards: encoding, collation and loaders."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import lightning as L
import torch
from torch.utils.data import DataLoader

from models.config import ConfigError, check_types

from .batch import Batch, Collator
from .chat import ChatTokenizer
from .images import decode
from .even_eval import EvenEvalStream
from .frames import read_frames
from .length_groups import LengthGrouping
from .packing import Packing
from .pipeline import ShardStream, parse_record
from .stream_position import StreamPosition, gather_ranks
from .validity import InvalidSample, check_image_count
from .windows import WindowLoader, trainer_window
from .workers import resolve_num_workers

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """The `data` config group: where shards come from (`source`: an object whose `prepare()` returns
    `data.sources.Shards` and `image_sizes()` its images' sizes, or None) and how they are batched
    (sizes per device)."""

    source: Any
    batch_size: int = 16
    eval_batch_size: int = 64
    num_workers: int | str = 1  # a count, or `auto` (data/workers.py)
    shuffle_buffer: int = 1000
    max_length: int = 2048
    group_by_length: bool = False  # training batches of similar length (data/length_groups.py)
    group_buffer_batches: int = 32  # batches per grouping (or packing) buffer
    packing: bool = False  # training rows packed with whole samples up to max_length tokens (data/packing.py)
    pack_buffer: int = 1024  # samples per packing buffer; data.batch_size then counts packed rows

    def __post_init__(self) -> None:
        check_types(self, "data")
        resolve_num_workers(self.num_workers)  # fails now, naming the setting, rather than at the first batch
        for name, ok, need in (
            ("batch_size", self.batch_size > 0, "> 0"),
            ("eval_batch_size", self.eval_batch_size > 0, "> 0"),
            ("shuffle_buffer", self.shuffle_buffer >= 0, ">= 0"),
            ("max_length", self.max_length > 0, "> 0"),
            ("group_buffer_batches", self.group_buffer_batches > 0, "> 0"),
            ("pack_buffer", self.pack_buffer > 0, "> 0"),
        ):
            if not ok:
                raise ConfigError(f"data.{name} must be {need}, got {getattr(self, name)}")
        if self.packing and self.group_by_length:
            raise ConfigError("data.packing and data.group_by_length are alternatives (packing sorts each buffer by length "
                              "itself): set one of them")
        if not callable(getattr(self.source, "prepare", None)):
            raise ConfigError(f"data.source must build an object with prepare() (a `_target_` such as data.sources.ShardSource), got {self.source!r}")


@dataclass
class ImageSpec:
    """What the model takes as images, from its family (models/families/): `processor` turns a PIL
    image into the model's pixels and reports its original size (`.pixels`, `.size`: LLaVA-1.5 pads
    to a square, LLaVA-NeXT tiles), `tokens` gives the visual tokens of an image of a size (its
    placeholders in the prompt), and `max_images_per_sample` how many one sample may hold (None: any
    number, as LLaVA-1.5 and HF's LlavaForConditionalGeneration take several images per row).
    Samples with more are skipped and counted (`too_many_images`). `video` turns a video sample's
    frames into the model's pixels (Qwen; a video counts as one image here)."""

    processor: Callable[[Any], Any]
    tokens: Callable[[tuple[int, int]], int] | None = None  # None: the ChatTokenizer's fixed count per image
    max_images_per_sample: int | None = None
    video: Callable[..., Any] | None = None  # frames, sampled fps, frame times -> ProcessedVideo; None: the family takes no video


class SampleEncoder:
    """Raw shard sample -> token ids, labels, image tensor, and what evaluation needs.

    A sample data/validity.py rejects, with too many images, too long or with an image that does not
    decode raises InvalidSample, which the stream counts by reason (data/pipeline.py)."""

    def __init__(self, chat: ChatTokenizer, image: ImageSpec):
        self.chat = chat
        self.image = image

    def __call__(self, raw: dict) -> dict:
        record, images, _, has_video = parse_record(raw)
        check_image_count(len(images) + has_video, self.image.max_images_per_sample)
        processed = [self._pixels(data, k) for k, data in enumerate(images)] if not has_video else [self._video(raw, record)]
        counts = [self.image.tokens(p.size) for p in processed] if self.image.tokens else None  # NeXT: by each image's size
        enc = self.chat.encode(record["conversations"], n_images=len(processed), image_tokens=counts,
                               videos=[p.timestamps for p in processed] if has_video else None)
        skills = record.get("skills") or []
        return {
            "key": raw.get("__key__", ""),
            "input_ids": enc.input_ids,
            "labels": enc.labels,
            "prompt_len": enc.prompt_len,
            "answer": enc.answer,
            "skill": str(skills[-1]) if isinstance(skills, list) and skills else "all",
            "pixel_values": [p.pixels for p in processed] if processed else None,
            "image_sizes": [tuple(p.size) for p in processed],
            "step_seconds": [getattr(p, "step_seconds", 0.0) for p in processed],  # a video's seconds per temporal step
            "truncated": enc.truncated,
        }

    def _video(self, raw: dict, record: dict):
        if self.image.video is None:
            raise InvalidSample("video_not_supported", "a video sample, but the model's family takes no video (the Qwen "
                                "families do)")
        frames, fps, times = read_frames(raw, record)
        return self.image.video(frames, fps, times)

    def _pixels(self, data: bytes, k: int):
        try:
            image = decode(data)
        except Exception as e:  # PIL raises many exception types for broken files
            raise InvalidSample("corrupt_image", f"image {k} does not decode ({type(e).__name__}: {e})") from None
        return self.image.processor(image)


class EvalLoader(DataLoader):
    """A DataLoader over a finite ShardStream that is read again at every evaluation: once it has been
    read to the end, its skipped samples (the same ones each time) are counted but not logged again.
    (Worker processes are new each pass, so the stream is told before they copy it.)"""

    complete_passes = 0

    def __iter__(self):
        self.dataset.quiet_skips = self.complete_passes > 0
        yield from super().__iter__()
        self.complete_passes += 1


class MLLMDataModule(L.LightningDataModule):
    """Infinite shuffled training stream (step-based training) and a finite validation pass.

    Checkpoints hold every rank's position in the training stream (data/stream_position.py): a resumed fit
    trains on exactly the batches the uninterrupted run would have seen next. `group_by_length` forms
    training batches of similar length, image and text-only apart, within buffers of
    `group_buffer_batches` batches (data/length_groups.py); `packing` packs whole samples into rows of
    `max_length` tokens within buffers of `pack_buffer` samples (data/packing.py); `padding_fraction` is the padded share of
    the training tokens consumed so far, by every attempt of a resumed run (the counts travel in checkpoints;
    logged as data/padding_fraction).
    """

    def __init__(
        self,
        train_urls: list[str],
        val_urls: list[str],
        encoder: SampleEncoder,
        pad_id: int,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        num_workers: int | str = 1,  # or "auto" (data/workers.py)
        shuffle_buffer: int = 1000,
        seed: int = 0,
        group_by_length: bool = False,
        group_buffer_batches: int = 32,
        packing: bool = False,
        max_length: int = 2048,
        pack_buffer: int = 1024,
    ):
        super().__init__()
        self.grouping = LengthGrouping(batch_size, group_buffer_batches) if group_by_length else None
        if packing:  # `batch_size` packed rows of up to `max_length` tokens
            self.grouping = Packing(batch_size, max_length, pack_buffer)
        self._tokens = [0, 0]  # padding, all: training batches consumed on this rank since the start
        self.train_urls, self.val_urls = train_urls, val_urls
        self.encoder = encoder
        self.collate = Collator(pad_id)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers = resolve_num_workers(num_workers)
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.position: StreamPosition | None = None  # after the last training batch consumed on this rank

    @property
    def padding_fraction(self) -> float | None:
        padding, total = self._tokens
        return padding / total if total else None

    def _loader(self, dataset, batch_size: int | None, loader=DataLoader, **kwargs) -> DataLoader:
        return loader(
            dataset,
            batch_size=batch_size,  # None: the dataset yields whole batches (length grouping)
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers else None,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        start = self.position  # restored from a checkpoint, or None: from the beginning
        self.position = start or StreamPosition.start(max(1, self.num_workers))
        ds = ShardStream(
            self.train_urls, self.encoder, seed=self.seed, shuffle_buffer=self.shuffle_buffer, infinite=True, start=start,
            grouping=self.grouping,
        )
        return self._loader(ds, None if self.grouping else self.batch_size, WindowLoader, window=trainer_window(self.trainer))

    # --- resuming: the training stream's position travels in checkpoints ---------------------------
    def on_before_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Called for the batch about to be trained on (prefetched batches are not consumed yet)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training and self.position is not None and batch.stream_pos is not None:
            self.position = self.position.after(batch.stream_pos)
        if trainer is not None and trainer.training:
            self._tokens[0] += batch.n_padding
            self._tokens[1] += batch.n_tokens
        return batch

    def state_dict(self) -> dict:
        if self.position is None or getattr(self, "trainer", None) is None:
            return {}
        return {
            "stream_positions": gather_ranks(self.trainer, self.position.to_tensor()),  # [world, readers + 1, 3]
            "token_counts": gather_ranks(self.trainer, torch.tensor(self._tokens, dtype=torch.int64)),  # [world, 2]
        }

    def load_state_dict(self, state: dict) -> None:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        counts = state.get("token_counts")  # absent in checkpoints from before: the fraction then counts from here
        if counts is not None and len(counts) == world:  # padding_fraction covers the batches of every attempt
            self._tokens = [int(v) for v in counts[rank].tolist()]
        positions = state.get("stream_positions")
        if positions is None:
            return
        position = StreamPosition.from_tensor(positions[min(rank, len(positions) - 1)])
        if len(positions) != world or position.n_readers != max(1, self.num_workers):
            log.warning(
                "the checkpoint's data position was written by %d rank(s) x %d reader(s), this run has %d x %d: "
                "the training stream cannot continue exactly and starts again from its first sample (resume with "
                "the same trainer.devices/num_nodes and data.num_workers to continue it)",
                len(positions), position.n_readers, world, max(1, self.num_workers),
            )
            return
        self.position = position

    def val_dataloader(self) -> DataLoader:
        stream = EvenEvalStream if self.trainer is not None and self.trainer.world_size > 1 else ShardStream
        return self._loader(stream(self.val_urls, self.encoder), self.eval_batch_size, EvalLoader)
