"""An evaluation stream that gives every process the same number of samples.

With sharded parameters (ZeRO-3, FSDP) every forward is a collective: a rank with one batch more
than the others would wait forever. So each reader takes every n-th sample of the whole eval set
(never whole shards, whose sizes differ), counts the set while reading it, and tops its share up to
ceil(N / n) with copies of its last sample flagged `padding`; padded rows are not scored or counted.
"""

from __future__ import annotations

from typing import Iterator

from .pipeline import ShardStream


class EvenEvalStream(ShardStream):
    def _raw(self, epoch: int) -> Iterator[dict]:
        slot, n_slots = self._slots()
        self._total = 0
        for i, sample in enumerate(self._tar_samples(self.urls)):
            self._total += 1
            if i % n_slots == slot:
                yield sample

    def __iter__(self) -> Iterator[dict]:
        last, produced = None, 0
        for sample in super().__iter__():
            last, produced = sample, produced + 1
            yield sample
        _, n_slots = self._slots()
        missing = -(-self._total // n_slots) - produced
        if missing > 0 and last is None:
            raise RuntimeError(
                f"evaluation data has {self._total} usable sample(s) for {n_slots} readers (ranks x workers): "
                "every reader needs at least one; use more eval samples or fewer data.num_workers"
            )
        for _ in range(missing):
            yield {**last, "padding": True, "n_skipped": 0, "skipped": {}}
