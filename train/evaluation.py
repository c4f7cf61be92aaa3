"""VQA accuracy per skill, with the two baselines that show the image is really used.

Answers are extracted the way benchmark harnesses read short answers (POPE's yes/no parser and
MMBench's option matcher read the start of the reply; VQAv2's normaliser lower-cases and strips
punctuation and articles): the reply's first line, normalised, cut to as many words as the
reference answer has. So a reply that never stops ("five even even ...") counts by the answer it
starts with, and a model that ignores the image scores about `val/acc_majority` instead of 0.
`val/acc_exact` keeps the strict reading (the whole normalised reply must equal the answer).

`val/acc_noimage`: the same model with every image blanked (a constant image at the normalised
mean); it should fall to about `val/acc_majority`, the accuracy of always answering the most
frequent answer of each skill in the evaluated set (an optimistic prior-only baseline).
"""

from __future__ import annotations

import importlib.util
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch.distributed as dist

from models.config import ConfigError, check_types


@dataclass
class EvalConfig:
    """The `eval` config node: how answers are generated for exact-match accuracy."""

    max_new_tokens: int = 8  # greedy generation length
    noimage: bool = True  # also evaluate with blanked images (val/acc_noimage)
    lmms_tasks: list[str] = field(default_factory=list)  # lmms-eval tasks run after validation (bench/<task>/<metric>)
    lmms_include_path: str | None = None  # a directory of local task YAMLs
    lmms_batch_size: int = 8
    lmms_limit: float | None = None  # documents per task (a fraction if < 1)

    def __post_init__(self) -> None:
        check_types(self, "eval")
        if self.max_new_tokens < 1:
            raise ConfigError(f"eval.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.lmms_tasks and importlib.util.find_spec("lmms_eval") is None:
            raise ConfigError("eval.lmms_tasks needs lmms-eval: python3 train/bootstrap.py --no-run --eval (docs/benchmarks.md)")


ARTICLES = {"a", "an", "the"}


def normalize(text: str) -> str:
    """Lower-case words without punctuation or articles (VQAv2-style), single-spaced."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(w for w in words if w not in ARTICLES)


def extract_answer(reply: str, reference: str) -> str:
    """The answer a harness reads from `reply`: its first non-empty line, normalised, cut to the
    number of words of the (normalised) reference."""
    first = next((line for line in reply.splitlines() if line.strip()), "")
    return " ".join(normalize(first).split()[: max(1, len(normalize(reference).split()))])


class AccuracyTracker:
    def __init__(self):
        # skill, answer, extracted prediction, exact prediction, extracted prediction without the image
        self.records: list[tuple[str, str, str, str, str | None]] = []

    def add(self, skills, answers, preds, preds_noimage=None, scored=None) -> None:
        """`scored[i]` False leaves row i out (padding that evened out the ranks' shares)."""
        noimg = preds_noimage if preds_noimage is not None else [None] * len(preds)
        scored = scored if scored is not None else [True] * len(preds)
        for s, a, p, q, ok in zip(skills, answers, preds, noimg, scored):
            if ok:
                q = None if q is None else extract_answer(q, a)
                self.records.append((s, normalize(a), extract_answer(p, a), normalize(p), q))

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
            f"{prefix}/acc_exact": _mean(r[1] == r[3] for r in records),
            f"{prefix}/acc_majority": _mean(r[1] == majority[r[0]] for r in records),
            f"{prefix}/n_samples": float(len(records)),
        }
        if records[0][4] is not None:
            out[f"{prefix}/acc_noimage"] = _mean(r[1] == r[4] for r in records)
        if len(by_skill) > 1:
            for s, rs in sorted(by_skill.items()):
                out[f"{prefix}/acc/{s}"] = _mean(r[1] == r[2] for r in rs)
        return out

    def reset(self) -> None:
        self.records = []


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(1, len(values))
