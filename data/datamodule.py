"""LightningDataModule over LLaVA-format shards: encoding, collation and loaders."""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader

from .chat import IGNORE, ChatTokenizer, pad
from .images import decode, preprocess
from .pipeline import ShardStream, parse_record


@dataclass
class ImageSpec:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class SampleEncoder:
    """Raw shard sample -> token ids, labels, image tensor, and what evaluation needs."""

    def __init__(self, chat: ChatTokenizer, image: ImageSpec):
        self.chat = chat
        self.image = image

    def __call__(self, raw: dict) -> dict:
        record, image_bytes = parse_record(raw)
        enc = self.chat.encode(record["conversations"], has_image=image_bytes is not None)
        pixel_values = None
        if image_bytes is not None:
            pixel_values = preprocess(decode(image_bytes), self.image.size, self.image.mean, self.image.std)
        skills = record.get("skills") or []
        return {
            "key": raw.get("__key__", ""),
            "input_ids": enc.input_ids,
            "labels": enc.labels,
            "prompt_len": enc.prompt_len,
            "answer": enc.answer,
            "skill": skills[-1] if skills else "all",
            "pixel_values": pixel_values,
            "truncated": enc.truncated,
        }


class Collator:
    """Right-padded training inputs plus left-padded generation prompts (everything before the last reply)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples: list[dict]) -> dict:
        ids = [s["input_ids"] for s in samples]
        input_ids = pad(ids, self.pad_id)
        prompts = [s["input_ids"][: s["prompt_len"]] for s in samples]
        prompt_ids = pad(prompts, self.pad_id, left=True)
        images = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
        return {
            "input_ids": input_ids,
            "attention_mask": pad([[1] * len(s) for s in ids], 0),
            "labels": pad([s["labels"] for s in samples], IGNORE),
            "prompt_ids": prompt_ids,
            "prompt_mask": pad([[1] * len(p) for p in prompts], 0, left=True),
            "pixel_values": torch.stack(images) if images else None,
            "answers": [s["answer"] for s in samples],
            "skills": [s["skill"] for s in samples],
            "keys": [s["key"] for s in samples],
            "n_skipped": sum(s["n_skipped"] for s in samples),
        }


class MLLMDataModule(L.LightningDataModule):
    """Infinite shuffled training stream (step-based training) and a finite validation pass."""

    def __init__(
        self,
        train_urls: list[str],
        val_urls: list[str],
        encoder: SampleEncoder,
        pad_id: int,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        num_workers: int = 1,
        shuffle_buffer: int = 1000,
        seed: int = 0,
    ):
        super().__init__()
        self.train_urls, self.val_urls = train_urls, val_urls
        self.encoder = encoder
        self.collate = Collator(pad_id)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed

    def _loader(self, dataset, batch_size: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers else None,
        )

    def train_dataloader(self) -> DataLoader:
        ds = ShardStream(self.train_urls, self.encoder, seed=self.seed, shuffle_buffer=self.shuffle_buffer, infinite=True)
        return self._loader(ds, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(ShardStream(self.val_urls, self.encoder), self.eval_batch_size)
