"""A synthetic temporal task: questions whose answers need the order of a video's frames.

Why: a plan that drops or merges video tokens over time has to be caught where time matters, and a
video model must be shown to use time at all. Every video (seeded numpy frames, a static textured
background) shows one of three events, and asks about it:

* **direction**: a square moves along one axis; "does the square move left or right ?" (or up or
  down). Its path is drawn first and then traversed one way or the other, so any single frame (and the
  set of frames) looks the same for both answers: only their order tells.
* **order**: a red and a blue square each show for 4 frames, one after the other; "which square
  appears first , red or blue ?". Both show equally long, so a frame showing one says nothing of order.
* **count**: a white dot flashes 1 to 4 times; "how many times does the light flash ?". It is lit for 4
  frames in every video (one flash of 4, ..., four of 1), so a single frame, or the frames shuffled,
  says nothing of the count.
* **color**: a square of one of the four colours above stands still throughout; "what color is the
  square ?". Any frame answers it: the positive control (the controls must keep its score), and what a
  model learns first, to read the video's tokens at all (without it a tiny model trained from scratch
  never leaves the answers' prior: the three temporal skills give no signal until time is understood).

So frame-shuffled and single-frame versions of a video must score at chance on the temporal skills
(1/2, 1/2, 1/4 per question) and keep the color score: the evaluation's controls
(`eval.video_controls`, train/evaluation.py) check it. One event
per video, because a moving square is a clock: beside it, shuffled frames could be put back in order
(up to reversal, which leaves a count intact). The skills take turns (val, balanced) or are drawn (train).
Frames are stored as data/frames.py describes (`frames.npy` and their timing: `fps` frames per second,
all sampled).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm
from webdataset import TarWriter

from .frames import FRAMES_MEMBER, encode_frames, timing
from .synthetic import ensure_built, write_dataset

FORMAT_VERSION = 2  # bump whenever the sample content for a given config changes
SKILLS = ("direction", "order", "count", "color")
TEMPORAL = SKILLS[:3]  # the skills whose answer needs the frames in order
NUMBER_WORDS = ("one", "two", "three", "four")
QUESTIONS = {
    "horizontal": "does the square move left or right ?",
    "vertical": "does the square move up or down ?",
    "order": "which square appears first , red or blue ?",
    "count": "how many times does the light flash ?",
    "color": "what color is the square ?",
}
CHANCE = {"direction": 1 / 2, "order": 1 / 2, "count": 1 / 4, "color": 1 / 4}  # of a model that cannot see (time)
SPLITS = ("train", "val")
MOVER, FLASH_SIDE, DOT = 6, 6, 4  # sides in pixels
COLORS = {"mover": (60, 220, 60), "red": (230, 40, 40), "blue": (40, 80, 240), "dot": (250, 250, 250)}
STILL_COLORS = {"green": COLORS["mover"], "red": COLORS["red"], "blue": COLORS["blue"], "white": COLORS["dot"]}
ANSWER_VOCAB = {"direction": ("left", "right", "up", "down"), "order": ("red", "blue"), "count": NUMBER_WORDS,
                "color": tuple(STILL_COLORS)}
LIT_FRAMES, SHOW_FRAMES = 4, 4  # the dot is lit for 4 frames in all; each coloured square shows for 4


@dataclass(frozen=True)
class VideoTaskConfig:
    seed: int = 0
    n_train: int = 9600  # videos in the train split (one question each)
    n_val: int = 600  # videos in the val split (the skills in turn)
    frame_size: int = 32
    n_frames: int = 16
    fps: float = 4.0  # the frames' rate: a 2-frame temporal step spans 0.5 s
    samples_per_shard: int = 600

    def __post_init__(self) -> None:
        if self.frame_size < 32 or self.n_frames < 12 or self.n_frames % 2:
            raise ValueError(f"frame_size must be >= 32 and n_frames even and >= 12 (room for the events), got "
                             f"{self.frame_size} / {self.n_frames}")
        if self.n_train < 0 or self.n_val < 0 or self.samples_per_shard < 1 or not self.fps > 0:
            raise ValueError("n_train and n_val must be >= 0, samples_per_shard >= 1 and fps > 0")


def config_hash(cfg: VideoTaskConfig) -> str:
    payload = json.dumps({"format_version": FORMAT_VERSION, "config": asdict(cfg)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_dir(root: str | Path, cfg: VideoTaskConfig) -> Path:
    return Path(root) / f"synthetic-video-s{cfg.seed}-{config_hash(cfg)}"


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    digest = hashlib.sha256(f"synthetic-video:{seed}:{split}:{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Events:
    """What a video shows: the mover's path and direction, the two squares' places and which shows
    first, the dot's place and its lit frames, the still square's colour (at the red square's place)."""

    path: tuple[tuple[int, int], ...]  # the mover's top-left corner per frame
    direction: str
    red: tuple[int, int]
    blue: tuple[int, int]
    first: str  # "red" or "blue"
    order_start: tuple[int, int]  # first frames of the first and the second square
    dot: tuple[int, int]
    lit: tuple[int, ...]  # frames the dot is lit
    flashes: int
    still: str


def _boxes_apart(boxes: list[tuple[int, int, int, int]]) -> bool:
    """No two (x0, y0, x1, y1) boxes touch (a 1-px gap)."""
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            if a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]:
                return False
    return True


def lit_frames(rng: np.random.Generator, n_frames: int, flashes: int) -> tuple[int, ...]:
    """`LIT_FRAMES` frames in `flashes` runs (a random composition) with at least one dark frame
    between runs, placed at random."""
    cuts = sorted(rng.choice(np.arange(1, LIT_FRAMES), flashes - 1, replace=False).tolist()) if flashes > 1 else []
    runs = np.diff([0, *cuts, LIT_FRAMES]).tolist()
    spare = n_frames - LIT_FRAMES - (flashes - 1)
    gaps = np.bincount(rng.integers(0, flashes + 1, spare), minlength=flashes + 1)  # extra dark frames per gap
    frames, t = [], int(gaps[0])
    for k, run in enumerate(runs):
        frames += range(t, t + run)
        t += run + 1 + int(gaps[k + 1])
    return tuple(frames)


def sample_events(rng: np.random.Generator, size: int, n_frames: int) -> Events:
    travel = size - MOVER - 6  # pixels the mover covers
    while True:
        axis = "horizontal" if rng.random() < 0.5 else "vertical"
        start, across = int(rng.integers(0, size - MOVER - travel + 1)), int(rng.integers(0, size - MOVER + 1))
        forward = rng.random() < 0.5
        steps = np.round(np.linspace(0, travel, n_frames)).astype(int)
        along = start + (steps if forward else travel - steps)
        path = tuple((int(a), across) if axis == "horizontal" else (across, int(a)) for a in along)
        red, blue, dot = (tuple(int(v) for v in rng.integers(0, size - side + 1, 2)) for side in (FLASH_SIDE, FLASH_SIDE, DOT))
        swept = (min(p[0] for p in path), min(p[1] for p in path), max(p[0] for p in path) + MOVER, max(p[1] for p in path) + MOVER)
        if _boxes_apart([swept, (*red, red[0] + FLASH_SIDE, red[1] + FLASH_SIDE), (*blue, blue[0] + FLASH_SIDE, blue[1] + FLASH_SIDE),
                         (*dot, dot[0] + DOT, dot[1] + DOT)]):
            break
    direction = {("horizontal", True): "right", ("horizontal", False): "left", ("vertical", True): "down",
                 ("vertical", False): "up"}[axis, forward]
    gap = int(rng.integers(0, n_frames - 2 * SHOW_FRAMES + 1))  # free frames, split before / between / after
    before = int(rng.integers(0, gap + 1))
    between = int(rng.integers(0, gap - before + 1))
    first_start = before
    second_start = before + SHOW_FRAMES + between
    flashes = int(rng.integers(1, 5))
    first = "red" if rng.random() < 0.5 else "blue"
    lit = lit_frames(rng, n_frames, flashes)
    return Events(path, direction, red, blue, first, (first_start, second_start), dot, lit, flashes,
                  still=str(rng.choice(ANSWER_VOCAB["color"])))


def render(events: Events, skill: str, rng: np.random.Generator, size: int, n_frames: int) -> np.ndarray:
    """uint8 frames [n_frames, size, size, 3] of the `skill`'s event over a static textured background."""
    background = rng.integers(30, 70, (size, size, 3), dtype=np.uint8)
    frames = np.repeat(background[None], n_frames, 0)
    second = "blue" if events.first == "red" else "red"
    for k in range(n_frames):
        if skill == "direction":
            x, y = events.path[k]
            frames[k, y : y + MOVER, x : x + MOVER] = COLORS["mover"]
        elif skill == "order":
            for name, begin in ((events.first, events.order_start[0]), (second, events.order_start[1])):
                if begin <= k < begin + SHOW_FRAMES:
                    x, y = getattr(events, name)
                    frames[k, y : y + FLASH_SIDE, x : x + FLASH_SIDE] = COLORS[name]
        elif skill == "color":
            x, y = events.red
            frames[k, y : y + FLASH_SIDE, x : x + FLASH_SIDE] = STILL_COLORS[events.still]
        elif k in events.lit:
            x, y = events.dot
            frames[k, y : y + DOT, x : x + DOT] = COLORS["dot"]
    return frames


def question(events: Events, skill: str) -> tuple[str, str]:
    if skill == "direction":
        axis = "horizontal" if events.direction in ("left", "right") else "vertical"
        return QUESTIONS[axis], events.direction
    if skill == "order":
        return QUESTIONS["order"], events.first
    if skill == "color":
        return QUESTIONS["color"], events.still
    return QUESTIONS["count"], NUMBER_WORDS[events.flashes - 1]


def make_sample(cfg: VideoTaskConfig, split: str, index: int) -> tuple[np.ndarray, dict]:
    """Frames and record of one sample: one event and its question (val: the skills in turn)."""
    rng = sample_rng(cfg.seed, split, index)
    skill = SKILLS[index % len(SKILLS)] if split == "val" else SKILLS[int(rng.integers(len(SKILLS)))]
    events = sample_events(rng, cfg.frame_size, cfg.n_frames)
    frames = render(events, skill, rng, cfg.frame_size, cfg.n_frames)
    text, answer = question(events, skill)
    conversations = [{"from": "human", "value": f"<image>\n{text}"}, {"from": "gpt", "value": answer}]
    record = {"id": f"{split}-{index:06d}", "video": f"synthetic/{split}-{index:06d}", "conversations": conversations,
              "skills": [skill], "frames": timing(cfg.n_frames, cfg.fps, list(range(cfg.n_frames)))}
    return frames, record


def all_texts(cfg: VideoTaskConfig | None = None) -> list[str]:
    """Every question and answer: the task's vocabulary for a tokenizer."""
    return list(QUESTIONS.values()) + [a for vocab in ANSWER_VOCAB.values() for a in vocab]


# --------------------------------------------------------------------------- writing


def _write_split(directory: Path, cfg: VideoTaskConfig, split: str, bar: tqdm) -> dict:
    n = cfg.n_train if split == "train" else cfg.n_val
    shards, answers = [], Counter()
    for shard, start in enumerate(range(0, n, cfg.samples_per_shard)):
        name = f"{split}-{shard:06d}.tar"
        with open(directory / name, "wb") as f, TarWriter(f, encoder=False, mtime=0) as writer:
            for index in range(start, min(start + cfg.samples_per_shard, n)):
                frames, record = make_sample(cfg, split, index)
                answers.update(zip(record["skills"], (t["value"] for t in record["conversations"][1::2])))
                writer.write({"__key__": record["id"], "json": json.dumps(record).encode(), FRAMES_MEMBER: encode_frames(frames)})
                bar.update(1)
        shards.append(name)
    counts = {s: {a: answers[s, a] for a in ANSWER_VOCAB[s]} for s in SKILLS}
    majority = {s: max(c.values()) / max(1, sum(c.values())) for s, c in counts.items()}
    return {"shards": shards, "num_samples": n, "answer_counts": counts, "majority_fraction": majority}


def generate(out_dir: str | Path, cfg: VideoTaskConfig, progress: bool = True) -> dict:
    def write(tmp: Path) -> dict:
        meta = {"format_version": FORMAT_VERSION, "config": asdict(cfg), "config_hash": config_hash(cfg), "skills": list(SKILLS),
                "answer_vocab": {s: list(v) for s, v in ANSWER_VOCAB.items()}, "chance": CHANCE, "splits": {}}
        with tqdm(total=cfg.n_train + cfg.n_val, desc="synthetic video", unit="video", disable=not progress) as bar:
            for split in SPLITS:
                meta["splits"][split] = _write_split(tmp, cfg, split, bar)
        return meta

    return write_dataset(out_dir, write)


def ensure_generated(out_dir: str | Path, cfg: VideoTaskConfig, progress: bool = True) -> dict:
    """Cached `generate` (data/synthetic.py `ensure_built`: one build per config, concurrent callers wait)."""
    return ensure_built(out_dir, config_hash(cfg), lambda: generate(out_dir, cfg, progress))


def main(argv: list[str] | None = None) -> None:
    defaults = VideoTaskConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    for name in ("seed", "n_train", "n_val", "frame_size", "n_frames", "samples_per_shard"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--fps", type=float, default=defaults.fps)
    args = parser.parse_args(argv)
    cfg = VideoTaskConfig(**{k: v for k, v in vars(args).items() if k != "out"})
    meta = ensure_generated(args.out, cfg, progress=True)
    json.dump({"config_hash": meta["config_hash"], **{s: i["num_samples"] for s, i in meta["splits"].items()}}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
