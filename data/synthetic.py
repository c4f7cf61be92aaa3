"""Deterministic synthetic visual question answering task, written as WebDataset shards.

Why: tiny MLLMs must be trainable on a CPU in minutes, and efficient architectures that drop or
prune visual tokens need a task whose skills fail at different granularities. Each image has 1-4
large objects (one per quadrant) and exactly one tiny dot that is smaller than a 4x4 patch.
Questions range from place lookups (what colour is the object in the top left?) over counting,
search (is there a red object?) and relations (do two places hold the same shape?) to fine
detail (what colour is the small dot?), so a model that throws away small details is caught
by the ``fine`` skill while still doing well on the coarse ones.

Scene sampling, question sampling, answering and rendering are small pure functions, so answers
can be checked on hand-built scenes; ``generate`` / ``ensure_generated`` write the shards.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import random
import shutil
import socket
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm
from webdataset import TarWriter

from .locking import locked

log = logging.getLogger(__name__)

FORMAT_VERSION = 7  # bump whenever the sample content for a given config changes

BACKGROUND = (40, 40, 40)
COLORS: dict[str, tuple[int, int, int]] = {  # regular objects
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 100, 245),
    "yellow": (245, 225, 40),
}
DOT_COLORS: dict[str, tuple[int, int, int]] = {  # the small dot has its own palette
    "white": (245, 245, 245),
    "cyan": (40, 230, 230),
    "magenta": (230, 50, 230),
    "orange": (250, 140, 20),
}
COLOR_NAMES = tuple(COLORS)
DOT_COLOR_NAMES = tuple(DOT_COLORS)
SHAPES = ("circle", "square", "triangle")
PLACES = ("top left", "top right", "bottom left", "bottom right")  # quadrant index 0..3
NUMBER_WORDS = ("zero", "one", "two", "three", "four")  # counts are 1..4
ATTRIBUTES = ("color", "shape")
SKILLS = ("exist", "color", "shape", "count", "relation", "fine")

TEMPLATES = {
    "exist": "is there a {} object ?",
    "color": "what color is the object in the {} ?",
    "shape": "what shape is the object in the {} ?",
    "count": "how many objects are there ?",
    "relation": "do the objects in the {} and the {} have the same {} ?",
    "fine": "what color is the small dot ?",
}
ANSWER_VOCAB: dict[str, tuple[str, ...]] = {
    "exist": ("yes", "no"),
    "color": COLOR_NAMES,
    "shape": SHAPES,
    "count": NUMBER_WORDS[1:],
    "relation": ("yes", "no"),
    "fine": DOT_COLOR_NAMES,
}
IMAGE_TOKEN = "<image>"
SPLITS = ("train", "val")

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), end-exclusive pixel coordinates
MIN_IMAGE_SIZE = 64  # the smallest scene with room for the fine-detail dot between objects


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 0
    n_train: int = 6000  # images (samples) in the train split
    n_val: int = 600  # samples in the val split (one question each)
    image_size: int = 64
    turns_per_image: int = 6
    describe: bool = True  # train conversations end with a dense scene description turn
    samples_per_shard: int = 1000
    # The high-resolution variant (conf/data/synthetic_hires.yaml): each square scene is centred on a
    # canvas of one of these widths (background on the sides), drawn per sample, so images of one
    # batch have different aspect ratios and, for a tiling family (LLaVA-NeXT), different token counts.
    canvas_widths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.image_size < MIN_IMAGE_SIZE or self.image_size % 2:  # smaller: no room for the dot between objects
            raise ValueError(f"image_size must be even and >= {MIN_IMAGE_SIZE}, got {self.image_size}")
        if self.n_train < 0 or self.n_val < 0:
            raise ValueError("n_train and n_val must be >= 0")
        if self.turns_per_image < 1 or self.samples_per_shard < 1:
            raise ValueError("turns_per_image and samples_per_shard must be >= 1")
        object.__setattr__(self, "canvas_widths", tuple(int(w) for w in self.canvas_widths))  # a frozen dataclass
        if any(w < self.image_size for w in self.canvas_widths):
            raise ValueError(f"canvas_widths {list(self.canvas_widths)} must be >= image_size {self.image_size}")

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """The (height, width) of the images it draws: the scene, on each canvas width."""
        return [(self.image_size, w) for w in self.canvas_widths or (self.image_size,)]


def config_record(cfg: SyntheticConfig) -> dict:
    """The config as hashed and recorded in meta.json (JSON types; no canvas_widths when unset, so
    caches written before the field existed stay valid)."""
    record = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
    if not cfg.canvas_widths:
        del record["canvas_widths"]
    return record


def config_hash(cfg: SyntheticConfig) -> str:
    """Identifies the dataset content: the config plus the format version."""
    payload = json.dumps({"format_version": FORMAT_VERSION, "config": config_record(cfg)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_dir(root: str | Path, cfg: SyntheticConfig) -> Path:
    """The dataset's directory in a cache shared by runs: named by every generation parameter and the
    format version, so runs with different configs never write (or read) each other's shards."""
    return Path(root) / f"synthetic-s{cfg.seed}-{config_hash(cfg)}"


def sample_rng(seed: int, split: str, index: int) -> random.Random:
    """One independent stream per (seed, split, sample): splits never share randomness, and a
    sample does not change when n_train / n_val change."""
    digest = hashlib.sha256(f"synthetic-vqa:{seed}:{split}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    quadrant: int  # index into PLACES
    box: Box


@dataclass(frozen=True)
class Dot:
    color: str
    box: Box


@dataclass(frozen=True)
class Scene:
    image_size: int
    objects: tuple[SceneObject, ...]
    dot: Dot


def quadrant_origin(quadrant: int, image_size: int) -> tuple[int, int]:
    half = image_size // 2
    return (quadrant % 2) * half, (quadrant // 2) * half


def dot_side(image_size: int) -> int:
    """3 px at 64 px: smaller than one 4x4 patch."""
    return max(3, image_size // 20)


def boxes_touch(a: Box, b: Box, gap: int = 1) -> bool:
    """True when the boxes overlap or are closer than ``gap`` pixels (keeps the dot visually
    separate from same-coloured objects)."""
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def object_side(image_size: int) -> int:
    return round(0.625 * (image_size // 2))


def sample_object(rng: random.Random, quadrant: int, image_size: int) -> SceneObject:
    """A random shape and colour at a fixed size (5/8 of the quadrant side), centred in its quadrant.

    Fixed placement keeps the coarse skills quick to learn for tiny models trained from scratch;
    the small dot (random place, smaller than a patch) carries the fine-detail difficulty."""
    half, side = image_size // 2, object_side(image_size)
    qx, qy = quadrant_origin(quadrant, image_size)
    x0, y0 = qx + (half - side) // 2, qy + (half - side) // 2
    return SceneObject(rng.choice(SHAPES), rng.choice(COLOR_NAMES), quadrant, (x0, y0, x0 + side, y0 + side))


def dot_spot(image_size: int) -> tuple[int, int]:
    """Top-left corner of the dot: just above-left of the image centre, inside the empty cross
    between the centred objects and inside a single patch (pixels 29-31 at 64 px: patch 7 of 4 px,
    patch 3 of 8 px). A fixed place makes the skill about detail, not search: the model must read
    one visual token, which token pruning and pooling are likely to lose."""
    c = image_size // 2 - dot_side(image_size)
    return c, c


def sample_dot(rng: random.Random, objects: tuple[SceneObject, ...], image_size: int) -> Dot:
    """The tiny dot (smaller than a 4x4 patch) at `dot_spot`, in its own palette."""
    side = dot_side(image_size)
    x0, y0 = dot_spot(image_size)
    box = (x0, y0, x0 + side, y0 + side)
    assert not any(boxes_touch(box, o.box) for o in objects)
    return Dot(rng.choice(DOT_COLOR_NAMES), box)


def sample_scene(rng: random.Random, image_size: int) -> Scene:
    quadrants = sorted(rng.sample(range(4), rng.randint(1, 4)))
    objects = tuple(sample_object(rng, q, image_size) for q in quadrants)
    return Scene(image_size, objects, sample_dot(rng, objects, image_size))


def render(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (scene.image_size, scene.image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    x0, y0, x1, y1 = scene.dot.box
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=DOT_COLORS[scene.dot.color])
    return img


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class Question:
    skill: str
    args: tuple[str, ...] = field(default=())

    @property
    def text(self) -> str:
        return TEMPLATES[self.skill].format(*self.args)


def column(quadrant: int) -> int:
    return quadrant % 2


def row(quadrant: int) -> int:
    return quadrant // 2


def _object_in(scene: Scene, place: str) -> SceneObject:
    found = [o for o in scene.objects if o.quadrant == PLACES.index(place)]
    if not found:
        raise ValueError(f"no object in the {place}")
    return found[0]


def _only_of_color(scene: Scene, color: str) -> SceneObject:
    found = [o for o in scene.objects if o.color == color]
    if len(found) != 1:
        raise ValueError(f"{len(found)} objects are {color}; the question needs exactly one")
    return found[0]


def _answer_relation(scene: Scene, place1: str, place2: str, attribute: str) -> str:
    a, b = _object_in(scene, place1), _object_in(scene, place2)
    if a is b:
        raise ValueError("a relation needs two different objects")
    return "yes" if getattr(a, attribute) == getattr(b, attribute) else "no"


def answer(scene: Scene, question: Question) -> str:
    """The ground-truth answer, computed from the scene only (single source of truth).

    Raises ValueError for questions that are ill-posed for this scene."""
    skill, args = question.skill, question.args
    if skill == "exist":
        return "yes" if any(o.color == args[0] for o in scene.objects) else "no"
    if skill == "color":
        return _object_in(scene, args[0]).color
    if skill == "shape":
        return _object_in(scene, args[0]).shape
    if skill == "count":
        return NUMBER_WORDS[len(scene.objects)]
    if skill == "relation":
        return _answer_relation(scene, *args)
    if skill == "fine":
        return scene.dot.color
    raise ValueError(f"unknown skill {skill!r}")


def _sample_exist(rng: random.Random, scene: Scene) -> Question:
    """Balanced yes/no: a colour of an object in the scene, or one that is in none of them (the dot's
    palette is separate, so the dot never answers it). One attribute, searched over every place:
    binding a colour to a shape ("is there a red circle?") is learned far too slowly by a tiny model
    trained from scratch for the 10-minute CPU budget."""
    present = sorted({o.color for o in scene.objects}, key=COLOR_NAMES.index)
    absent = [c for c in COLOR_NAMES if c not in present]
    if not absent or rng.random() < 0.5:
        return Question("exist", (rng.choice(present),))
    return Question("exist", (rng.choice(absent),))


def _sample_place(rng: random.Random, scene: Scene, skill: str) -> Question:
    return Question(skill, (PLACES[rng.choice(scene.objects).quadrant],))


def _sample_relation(rng: random.Random, scene: Scene) -> Question | None:
    """Same colour / same shape between two occupied places, balanced yes/no when the scene allows."""
    if len(scene.objects) < 2:
        return None
    attribute = rng.choice(ATTRIBUTES)
    pairs = [(a, b) for i, a in enumerate(scene.objects) for b in scene.objects[i + 1 :]]
    want = rng.random() < 0.5
    matching = [(a, b) for a, b in pairs if (getattr(a, attribute) == getattr(b, attribute)) == want]
    a, b = rng.choice(matching or pairs)
    if rng.random() < 0.5:
        a, b = b, a
    return Question("relation", (PLACES[a.quadrant], PLACES[b.quadrant], attribute))


def sample_question(rng: random.Random, scene: Scene, skill: str) -> Question | None:
    """A random well-posed question of ``skill`` for ``scene``, or None when there is none."""
    samplers = {
        "exist": _sample_exist,
        "color": lambda r, sc: _sample_place(r, sc, "color"),
        "shape": lambda r, sc: _sample_place(r, sc, "shape"),
        "count": lambda _rng, s: Question("count"),
        "relation": _sample_relation,
        "fine": lambda _rng, s: Question("fine"),
    }
    return samplers[skill](rng, scene)


# Skills that need search over the image, comparisons or the one token of the tiny dot are
# learned far more slowly than place lookups; training conversations ask them twice as often.
TRAIN_ROUND = SKILLS + ("exist", "relation", "fine")


def sample_turns(rng: random.Random, scene: Scene, n_turns: int) -> list[Question]:
    """``n_turns`` distinct questions; skills are drawn without replacement in rounds of
    ``TRAIN_ROUND`` (every skill, the slow ones twice)."""
    questions: list[Question] = []
    order: list[str] = []
    attempts = 0
    while len(questions) < n_turns:  # ends: "count" and "fine" are always possible, repeats allowed late
        if not order:
            order = rng.sample(TRAIN_ROUND, len(TRAIN_ROUND))
        question = sample_question(rng, scene, order.pop())
        attempts += 1
        if question is not None and (question not in questions or attempts > 50 * n_turns):
            questions.append(question)  # repeats only once the scene has run out of questions
    return questions


DESCRIBE_PROMPT = "describe the image ."


def describe(scene: Scene) -> str:
    """Every object by place, then the dot: dense supervision that grounds every attribute at once
    (LLaVA mixes such descriptions with short answers). Always the *last* turn of a training
    conversation, so no question can copy its answer from it."""
    parts = [f"{PLACES[o.quadrant]} {o.color} {o.shape}" for o in sorted(scene.objects, key=lambda o: o.quadrant)]
    return " , ".join(parts + [f"{scene.dot.color} dot"]) + " ."


def canvas(cfg: SyntheticConfig, split: str, index: int, image: Image.Image) -> Image.Image:
    """`image` centred on its sample's canvas width (its own random stream: the scene is unchanged)."""
    if not cfg.canvas_widths:
        return image
    width = sample_rng(cfg.seed, f"{split}-canvas", index).choice(cfg.canvas_widths)
    out = Image.new("RGB", (width, cfg.image_size), BACKGROUND)
    out.paste(image, ((width - cfg.image_size) // 2, 0))
    return out


def make_record(sample_id: str, scene: Scene, questions: list[Question], with_description: bool = False) -> dict:
    """LLaVA-style conversation; ``<image>`` once, at the start of the first human turn."""
    conversations = []
    for i, q in enumerate(questions):
        prompt = f"{IMAGE_TOKEN}\n{q.text}" if i == 0 else q.text
        conversations.append({"from": "human", "value": prompt})
        conversations.append({"from": "gpt", "value": answer(scene, q)})
    skills = [q.skill for q in questions]
    if with_description:
        conversations.append({"from": "human", "value": DESCRIBE_PROMPT})
        conversations.append({"from": "gpt", "value": describe(scene)})
        skills.append("describe")
    return {"id": sample_id, "conversations": conversations, "skills": skills}


def make_sample(cfg: SyntheticConfig, split: str, index: int) -> tuple[Scene, dict]:
    """Scene and record of one sample. Val cycles through the skills (balanced, one turn each)
    and redraws the scene until that skill is possible."""
    rng = sample_rng(cfg.seed, split, index)
    sample_id = f"{split}-{index:06d}"
    if split == "train":
        scene = sample_scene(rng, cfg.image_size)
        return scene, make_record(sample_id, scene, sample_turns(rng, scene, cfg.turns_per_image), cfg.describe)
    skill = SKILLS[index % len(SKILLS)]
    while True:
        scene = sample_scene(rng, cfg.image_size)
        question = sample_question(rng, scene, skill)
        if question is not None:
            return scene, make_record(sample_id, scene, [question])


def all_texts(cfg: SyntheticConfig | None = None) -> list[str]:
    """Every question template with every value, plus every answer: the full task vocabulary for
    training a tokenizer. (The vocabulary does not depend on ``cfg``.)"""
    texts = [TEMPLATES["exist"].format(c) for c in COLOR_NAMES]
    texts += [TEMPLATES["color"].format(p) for p in PLACES]
    texts += [TEMPLATES["shape"].format(p) for p in PLACES]
    texts.append(TEMPLATES["count"])
    texts += [TEMPLATES["relation"].format(a, b, t) for t in ATTRIBUTES for a in PLACES for b in PLACES if a != b]
    texts.append(TEMPLATES["fine"])
    texts.append(DESCRIBE_PROMPT)
    texts += [f"{p} {c} {s} ," for p in PLACES for c in COLOR_NAMES for s in SHAPES]
    texts += [f"{c} dot ." for c in DOT_COLOR_NAMES]
    answers = dict.fromkeys(a for vocab in ANSWER_VOCAB.values() for a in vocab)  # ordered, unique
    return texts + list(answers)


# --------------------------------------------------------------------------- writing


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def _split_size(cfg: SyntheticConfig, split: str) -> int:
    return cfg.n_train if split == "train" else cfg.n_val


def _split_stats(skill_answers: list[tuple[str, str]]) -> dict:
    """Per-skill answer counts and the majority answer (the trivial baseline per skill)."""
    answer_counts = {s: {a: 0 for a in ANSWER_VOCAB[s]} for s in SKILLS}
    for skill, ans in skill_answers:
        answer_counts[skill][ans] += 1
    skill_counts = {s: sum(c.values()) for s, c in answer_counts.items()}
    majority = {s: max(c, key=c.get) for s, c in answer_counts.items() if skill_counts[s]}
    fraction = {s: answer_counts[s][a] / skill_counts[s] for s, a in majority.items()}
    return {"skill_counts": skill_counts, "answer_counts": answer_counts,
            "majority_answer": majority, "majority_fraction": fraction}


def _write_split(directory: Path, cfg: SyntheticConfig, split: str, bar: tqdm) -> dict:
    """Writes one split's shards; fixed tar metadata (mtime 0) makes them byte-reproducible."""
    n = _split_size(cfg, split)
    shards, skill_answers = [], []
    for shard_index, start in enumerate(range(0, n, cfg.samples_per_shard)):
        name = shard_name(split, shard_index)
        with open(directory / name, "wb") as f, TarWriter(f, encoder=False, mtime=0) as writer:
            for index in range(start, min(start + cfg.samples_per_shard, n)):
                scene, record = make_sample(cfg, split, index)
                answers = [t["value"] for t in record["conversations"][1::2]]
                skill_answers += [(k, a) for k, a in zip(record["skills"], answers) if k in SKILLS]
                writer.write({"__key__": record["id"], "png": encode_png(canvas(cfg, split, index, render(scene))),
                              "json": json.dumps(record).encode("utf-8")})
                bar.update(1)
        shards.append(name)
    return {"shards": shards, "num_samples": n, "num_turns": len(skill_answers), **_split_stats(skill_answers)}


def _our_file(name: str) -> bool:
    if name == "meta.json":
        return True
    split, _, rest = name.partition("-")
    return split in SPLITS and rest.endswith(".tar") and rest[:-4].isdigit()


def _check_replaceable(out_dir: Path) -> None:
    """Regeneration replaces ``out_dir`` wholesale, so refuse if it holds anything else."""
    if out_dir.exists():
        foreign = [p.name for p in out_dir.iterdir() if not _our_file(p.name)]
        if foreign:
            raise FileExistsError(f"{out_dir} contains files this generator did not write: {foreign[:5]}")


def _replace_dir(src: Path, dst: Path) -> None:
    """Moves the finished ``src`` to ``dst``; an old dataset at ``dst`` is swapped out first."""
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.rename(dst, old / dst.name)
        os.rename(src, dst)
        shutil.rmtree(old)
    else:
        os.rename(src, dst)


def generate(out_dir: str | Path, cfg: SyntheticConfig, progress: bool = True) -> dict:
    """(Re)generates the dataset into ``out_dir`` and returns its meta (``write_dataset``). Not safe
    against concurrent callers on the same ``out_dir``: use ``ensure_generated`` for that."""

    def write(tmp: Path) -> dict:
        meta = {"format_version": FORMAT_VERSION, "config": config_record(cfg), "config_hash": config_hash(cfg),
                "skills": list(SKILLS), "answer_vocab": {s: list(v) for s, v in ANSWER_VOCAB.items()},
                "splits": {}}
        total = cfg.n_train + cfg.n_val
        with tqdm(total=total, desc="synthetic vqa", unit="img", disable=not progress) as bar:
            for split in SPLITS:
                meta["splits"][split] = _write_split(tmp, cfg, split, bar)
        return meta

    return write_dataset(out_dir, write)


def write_dataset(out_dir: str | Path, write) -> dict:
    """`write(tmp)` writes a dataset's shards into a temporary sibling directory of ``out_dir`` and
    returns its meta (saved as meta.json); the directory is renamed into place only when complete, so
    an interruption never leaves a dataset that looks finished. Shared by the generated tasks."""
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the dataset may be shared between users
        meta = write(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def load_meta(out_dir: str | Path, cfg: SyntheticConfig) -> dict | None:
    """The existing meta if ``out_dir`` holds a complete dataset for ``cfg``, else None."""
    return load_built(out_dir, config_hash(cfg))


def load_built(out_dir: str | Path, content_hash: str) -> dict | None:
    """The meta of a complete dataset in ``out_dir`` whose content hash is ``content_hash``, else None."""
    out_dir = Path(out_dir)
    try:
        meta = json.loads((out_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("config_hash") != content_hash:
        return None
    shards = [s for split in meta.get("splits", {}).values() for s in split.get("shards", [])]
    if not all((out_dir / s).is_file() for s in shards):
        return None
    return meta


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Leftovers of killed generations (only called while holding the lock)."""
    for pattern in (f".{out_dir.name}.tmp-*", f".{out_dir.name}.old-*"):
        for path in out_dir.parent.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def ensure_generated(out_dir: str | Path, cfg: SyntheticConfig, progress: bool = True) -> dict:
    """Cached ``generate`` (``ensure_built``)."""
    return ensure_built(out_dir, config_hash(cfg), lambda: generate(out_dir, cfg, progress))


def ensure_built(out_dir: str | Path, content_hash: str, build) -> dict:
    """Reuses a complete dataset with the same content hash, or runs ``build()`` (which writes it with
    ``write_dataset`` and returns its meta). A file lock next to ``out_dir`` makes concurrent callers
    (several trainers started at once) wait for a single generator and then reuse its output: one build
    per filesystem, whether the cache is shared by all nodes of a job or local to each (every node then
    builds its own; the lock must hold across the nodes that share one, as flock does on NFSv4). A
    complete dataset of the same content is never rewritten; one of another is replaced, so a cache
    shared by runs of different configs names ``out_dir`` by the content (``cache_dir``)."""
    out_dir = Path(out_dir)
    meta = load_built(out_dir, content_hash)
    if meta is not None:
        return meta
    with locked(out_dir):
        meta = load_built(out_dir, content_hash)  # another process may have finished while we waited
        if meta is not None:
            return meta
        _remove_stale_temporaries(out_dir)
        meta = build()
        # one line per build: a multi-node job with a node-local cache logs one per node, a shared cache one
        log.info("generated the synthetic dataset %s on %s", out_dir, socket.gethostname())
        return meta


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--n-train", type=int, default=defaults.n_train)
    parser.add_argument("--n-val", type=int, default=defaults.n_val)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--turns-per-image", type=int, default=defaults.turns_per_image)
    parser.add_argument("--samples-per-shard", type=int, default=defaults.samples_per_shard)
    parser.add_argument("--force", action="store_true", help="regenerate even if a cached copy exists")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    cfg = SyntheticConfig(seed=args.seed, n_train=args.n_train, n_val=args.n_val, image_size=args.image_size,
                          turns_per_image=args.turns_per_image, samples_per_shard=args.samples_per_shard)
    run = generate if args.force else ensure_generated
    meta = run(args.out, cfg, progress=not args.no_progress)
    summary = {"meta": str(Path(args.out) / "meta.json"), "config_hash": meta["config_hash"],
               **{split: info["num_samples"] for split, info in meta["splits"].items()},
               "val_majority_fraction": meta["splits"]["val"]["majority_fraction"]}
    json.dump(summary, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
