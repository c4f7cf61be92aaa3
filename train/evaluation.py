"""Exact-match VQA accuracy per skill, with the two baselines that show the image is really used.

`val/acc_noimage`: the same model with every image blanked (a constant image at the normalised
mean); it should fall to about `val/acc_majority`, the accuracy of always answering the most
frequent answer of each skill in the evaluated set (an optimistic prior-only baseline).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import torch.distributed as dist

from models.config import ConfigError, check_types


@dataclass
class EvalConfig:
    """The `eval` config node: how answers are generated for exact-match accuracy."""

    max_new_tokens: int = 8  # greedy generation length
    noimage: bool = True  # also evaluate with blanked images (val/acc_noimage)

    def __post_init__(self) -> None:
        check_types(self, "eval")
        if self.max_new_tokens < 1:
            raise ConfigError(f"eval.max_new_tokens must be >= 1, got {self.max_new_tokens}")


def normalize(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


class AccuracyTracker:
    def __init__(self):
        self.records: list[tuple[str, str, str, str | None]] = []  # skill, answer, pred, pred without image

    def add(self, skills, answers, preds, preds_noimage=None, scored=None) -> None:
        """`scored[i]` False leaves row i out (padding that evened out the ranks' shares)."""
        noimg = preds_noimage if preds_noimage is not None else [None] * len(preds)
        scored = scored if scored is not None else [True] * len(preds)
        for s, a, p, q, ok in zip(skills, answers, preds, noimg, scored):
            if ok:
                self.records.append((s, normalize(a), normalize(p), None if q is None else normalize(q)))

    def gather(self) -> list[tuple]:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self.records)
            return [r for part in parts for r in part]
        return self.records

    def metrics(self, prefix: str = "val") -> dict[str, float]:
        records = self.gather()
        if not records:
            return {}
        by_skill = defaultdict(list)
        for r in records:
            by_skill[r[0]].append(r)
        majority = {s: Counter(r[1] for r in rs).most_common(1)[0][0] for s, rs in by_skill.items()}
        out = {
            f"{prefix}/acc": _mean(r[1] == r[2] for r in records),
            f"{prefix}/acc_majority": _mean(r[1] == majority[r[0]] for r in records),
            f"{prefix}/n_samples": float(len(records)),
        }
        if records[0][3] is not None:
            out[f"{prefix}/acc_noimage"] = _mean(r[1] == r[3] for r in records)
        if len(by_skill) > 1:
            for s, rs in sorted(by_skill.items()):
                out[f"{prefix}/acc/{s}"] = _mean(r[1] == r[2] for r in rs)
        return out

    def reset(self) -> None:
        self.records = []


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(1, len(values))
