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

`val/acc_shuffled` and `val/acc_single` (`eval.video_controls`, batches with video): the same questions
with each video's frames in a random order, or one random frame repeated throughout (`video_controls`);
on a task whose answers need time (data/synthetic_video.py) they should fall to chance, per skill too
(`val/acc_shuffled/<skill>`).
"""

from __future__ import annotations

import importlib.util
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from models.config import ConfigError, check_types


@dataclass
class EvalConfig:
    """The `eval` config node: how answers are generated for exact-match accuracy."""

    max_new_tokens: int = 8  # greedy generation length
    compile_decode: bool = False  # decode steps compiled whole (models/decoding.py compiled_step: CUDA graphs on CUDA)
    noimage: bool = True  # also evaluate with blanked images (val/acc_noimage)
    video_controls: bool = True  # batches with video: also with frames shuffled and one frame repeated (val/acc_shuffled, _single)
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
        # skill, answer, extracted prediction, exact prediction, extracted prediction without the image,
        # extracted predictions of the named controls
        self.records: list[tuple[str, str, str, str, str | None, dict[str, str]]] = []

    def add(self, skills, answers, preds, preds_noimage=None, scored=None, controls: dict[str, list[str]] | None = None) -> None:
        """`scored[i]` False leaves row i out (padding that evened out the ranks' shares); `controls`:
        predictions of the same rows under named controls (e.g. "shuffled" video frames)."""
        noimg = preds_noimage if preds_noimage is not None else [None] * len(preds)
        scored = scored if scored is not None else [True] * len(preds)
        controls = controls or {}
        for i, (s, a, p, q, ok) in enumerate(zip(skills, answers, preds, noimg, scored)):
            if ok:
                q = None if q is None else extract_answer(q, a)
                self.records.append((s, normalize(a), extract_answer(p, a), normalize(p), q,
                                     {name: extract_answer(c[i], a) for name, c in controls.items()}))

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
        controls = sorted({name for r in records for name in r[5]})
        for name in controls:
            out[f"{prefix}/acc_{name}"] = _mean(r[1] == r[5][name] for r in records if name in r[5])
        if len(by_skill) > 1:
            for s, rs in sorted(by_skill.items()):
                out[f"{prefix}/acc/{s}"] = _mean(r[1] == r[2] for r in rs)
                for name in controls:
                    out[f"{prefix}/acc_{name}/{s}"] = _mean(r[1] == r[5][name] for r in rs if name in r[5])
        return out

    def reset(self) -> None:
        self.records = []


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(1, len(values))


CONTROLS = ("shuffled", "single")


def video_controls(model, pixel_values, image_sizes, step_seconds, kind: str, seed: int = 0):
    """The batch's pixel values with each video's frames in a random order (`shuffled`) or one random
    frame repeated throughout (`single`), drawn from a generator seeded by `seed` (the same draws at
    every evaluation); images are left as they are. The family knows its pixel layout
    (`Family.reorder_frames`)."""
    if kind not in CONTROLS:
        raise ValueError(f"video control must be one of {CONTROLS}, got {kind!r}")
    family, config = model.family, model.config
    g = torch.Generator().manual_seed(seed)
    frames = family.frames_per_item(config, image_sizes)
    orders = []
    for n, seconds in zip(frames, step_seconds.tolist()):
        if seconds <= 0:  # a still image
            orders.append(torch.arange(n))
        elif kind == "shuffled":
            orders.append(torch.randperm(n, generator=g))
        else:
            orders.append(torch.full((n,), int(torch.randint(n, (1,), generator=g))))
    return family.reorder_frames(config, pixel_values, image_sizes, orders)
