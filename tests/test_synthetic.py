"""Synthetic VQA task: correct answers, balance, determinism, caching and readable shards."""

import io
import json
import multiprocessing
import random
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image


from data import synthetic as syn  # noqa: E402
from data.synthetic import Dot, Question, Scene, SceneObject, SyntheticConfig, answer  # noqa: E402

SMALL = SyntheticConfig(seed=3, n_train=30, n_val=18, turns_per_image=6, samples_per_shard=8)


def obj(shape, color, quadrant, size=64, side=14, offset=(4, 4)):
    qx, qy = syn.quadrant_origin(quadrant, size)
    x0, y0 = qx + offset[0], qy + offset[1]
    return SceneObject(shape, color, quadrant, (x0, y0, x0 + side, y0 + side))


@pytest.fixture
def scene():
    """red circle (top left), blue square (top right), red triangle (bottom right), green dot."""
    objects = (obj("circle", "red", 0), obj("square", "blue", 1), obj("triangle", "red", 3))
    return Scene(64, objects, Dot("green", (20, 40, 22, 42)))


def read_samples(out_dir, shards):
    return list(wds.WebDataset([str(Path(out_dir) / s) for s in shards], shardshuffle=False))


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    "question, expected",
    [
        (Question("exist", ("red", "circle")), "yes"),
        (Question("exist", ("blue", "circle")), "no"),
        (Question("exist", ("green", "square")), "no"),  # the green dot is not an object
        (Question("color", ("top right",)), "blue"),
        (Question("color", ("bottom right",)), "red"),
        (Question("shape", ("blue",)), "square"),
        (Question("count", ("circle",)), "one"),
        (Question("count", ("square",)), "one"),
        (Question("count", ("triangle",)), "one"),
        (Question("position", ("red", "circle", "left of", "blue", "square")), "yes"),
        (Question("position", ("blue", "square", "left of", "red", "circle")), "no"),
        (Question("position", ("red", "circle", "above", "red", "triangle")), "yes"),
        (Question("position", ("red", "triangle", "above", "blue", "square")), "no"),
        (Question("position", ("red", "circle", "left of", "red", "triangle")), "yes"),
        (Question("fine", ()), "green"),
    ],
)
def test_answer_on_hand_built_scene(scene, question, expected):
    assert answer(scene, question) == expected


@pytest.mark.parametrize(
    "question",
    [
        Question("color", ("bottom left",)),  # empty quadrant
        Question("shape", ("red",)),  # two red objects
        Question("position", ("red", "circle", "left of", "red", "circle")),  # same column
        Question("position", ("blue", "square", "above", "red", "circle")),  # same row
        Question("position", ("green", "circle", "above", "red", "triangle")),  # absent object
    ],
)
def test_ill_posed_questions_raise(scene, question):
    with pytest.raises(ValueError):
        answer(scene, question)


def test_count_counts_several_objects():
    objects = tuple(obj("square", c, q) for q, c in enumerate(("red", "red", "blue", "white")))
    scene = Scene(64, objects, Dot("red", (30, 30, 32, 32)))
    assert answer(scene, Question("count", ("square",))) == "four"
    assert answer(scene, Question("count", ("circle",))) == "zero"
    assert syn.sample_question(random.Random(0), scene, "shape") in (Question("shape", (c,)) for c in ("blue", "white"))
    rng = random.Random(0)
    positions = {syn.sample_question(rng, scene, "position") for _ in range(50)}
    assert {q.args[0] for q in positions} == {"blue", "white"}  # never the ambiguous "red square"
    assert {q.args[2] for q in positions} == {"left of"}  # blue and white share a row


def test_single_object_scene_has_no_position_question():
    scene = Scene(64, (obj("circle", "white", 2),), Dot("white", (50, 5, 52, 7)))
    assert syn.sample_question(random.Random(0), scene, "position") is None
    assert answer(scene, Question("shape", ("white",))) == "circle"
    assert answer(scene, Question("color", ("bottom left",))) == "white"
    questions = syn.sample_turns(random.Random(0), scene, 6)
    assert len(questions) == len(set(questions)) == 6
    assert "position" not in {q.skill for q in questions}


def test_question_text_is_clean():
    for text in syn.all_texts(SMALL):
        assert text == text.lower() and text == text.strip()
        assert "?" not in text or text.endswith(" ?")
    assert "is the red circle left of the blue square ?" in syn.all_texts()
    assert "what color is the small dot ?" in syn.all_texts()


def test_sampled_questions_are_well_posed_and_balanced():
    rng = random.Random(0)
    answers = {s: Counter() for s in syn.SKILLS}
    for _ in range(3000):
        scene = syn.sample_scene(rng, 64)
        for skill in syn.SKILLS:
            question = syn.sample_question(rng, scene, skill)
            if question is not None:
                answers[skill][answer(scene, question)] += 1  # raises if ill-posed
    for skill in ("exist", "position"):
        assert 0.45 < answers[skill]["yes"] / answers[skill].total() < 0.55
    assert answers["count"]["zero"] / answers["count"].total() < 0.5
    assert set(answers["count"]) == set(syn.NUMBER_WORDS)


def test_all_texts_cover_every_sampled_text():
    vocab = set(syn.all_texts(SMALL))
    rng = random.Random(1)
    for _ in range(300):
        scene = syn.sample_scene(rng, 64)
        for q in syn.sample_turns(rng, scene, 6):
            assert q.text in vocab and answer(scene, q) in vocab


# --------------------------------------------------------------------------- scenes and images


@pytest.mark.parametrize("size", [32, 64, 96])
def test_objects_inside_distinct_quadrants_and_dot_tiny_and_separate(size):
    rng = random.Random(size)
    half = size // 2
    for _ in range(500):
        scene = syn.sample_scene(rng, size)
        assert 1 <= len(scene.objects) <= 4
        assert len({o.quadrant for o in scene.objects}) == len(scene.objects)
        for o in scene.objects:
            qx, qy = syn.quadrant_origin(o.quadrant, size)
            x0, y0, x1, y1 = o.box
            assert qx <= x0 < x1 <= qx + half and qy <= y0 < y1 <= qy + half
            assert 0.35 * half <= x1 - x0 <= 0.75 * half
        x0, y0, x1, y1 = scene.dot.box
        assert x1 - x0 == y1 - y0 == max(2, size // 24)
        assert size > 64 or x1 - x0 < 4  # smaller than a 4x4 patch at the default size
        assert 0 <= x0 and x1 <= size and 0 <= y0 and y1 <= size
        assert not any(syn.boxes_touch(scene.dot.box, o.box, gap=0) for o in scene.objects)


def test_render_draws_objects_and_dot(scene):
    img = syn.render(scene)
    assert img.size == (64, 64) and img.mode == "RGB"
    assert img.getpixel((20, 40)) == img.getpixel((21, 41)) == syn.COLORS["green"]  # the dot
    assert img.getpixel((22, 42)) == syn.BACKGROUND
    assert img.getpixel((4 + 7, 4 + 7)) == syn.COLORS["red"]  # centre of the circle
    assert img.getpixel((32 + 4, 4)) == syn.COLORS["blue"]  # square corner
    assert img.getpixel((0, 0)) == syn.BACKGROUND


# --------------------------------------------------------------------------- records


def test_records_format():
    for index in range(20):
        _, record = syn.make_sample(SMALL, "train", index)
        turns = record["conversations"]
        assert record["id"] == f"train-{index:06d}"
        assert len(turns) == 2 * SMALL.turns_per_image == 2 * len(record["skills"])
        assert [t["from"] for t in turns] == ["human", "gpt"] * SMALL.turns_per_image
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        assert len({t["value"] for t in turns[2::2]} | {turns[0]["value"][8:]}) == SMALL.turns_per_image
        assert all(" " not in t["value"] for t in turns[1::2])
        # the first round of skills is drawn without replacement
        first_round = record["skills"][: len(set(record["skills"]))]
        assert len(set(first_round)) == len(first_round)


def test_val_skills_are_balanced_and_single_turn():
    cfg = SyntheticConfig(n_train=0, n_val=60)
    skills = Counter()
    for index in range(cfg.n_val):
        _, record = syn.make_sample(cfg, "val", index)
        assert len(record["conversations"]) == 2
        skills.update(record["skills"])
    assert skills == {s: 10 for s in syn.SKILLS}


def test_splits_use_different_streams():
    assert syn.make_sample(SMALL, "train", 0)[0] != syn.make_sample(SMALL, "val", 0)[0]
    other_seed = SyntheticConfig(seed=SMALL.seed + 1)
    assert syn.make_sample(SMALL, "train", 0)[0] != syn.make_sample(other_seed, "train", 0)[0]


# --------------------------------------------------------------------------- shards, determinism, caching


def test_generate_writes_readable_shards_matching_meta(tmp_path):
    meta = syn.generate(tmp_path / "ds", SMALL, progress=False)
    assert json.loads((tmp_path / "ds" / "meta.json").read_text()) == meta
    assert meta["config_hash"] == syn.config_hash(SMALL)
    assert meta["splits"]["train"]["shards"] == [f"train-{i:06d}.tar" for i in range(4)]
    for split in ("train", "val"):
        info = meta["splits"][split]
        samples = read_samples(tmp_path / "ds", info["shards"])
        assert len(samples) == info["num_samples"] == getattr(SMALL, f"n_{split}")
        records = [json.loads(s["json"]) for s in samples]
        assert [s["__key__"] for s in samples] == [r["id"] for r in records]
        counts = Counter((sk, t["value"]) for r in records for sk, t in zip(r["skills"], r["conversations"][1::2]))
        assert {(sk, a): n for sk, c in info["answer_counts"].items() for a, n in c.items() if n} == counts
        image = Image.open(io.BytesIO(samples[0]["png"]))
        assert image.size == (SMALL.image_size, SMALL.image_size) and image.mode == "RGB"
    val = meta["splits"]["val"]
    assert val["skill_counts"] == {s: 3 for s in syn.SKILLS}
    assert all(val["answer_counts"][s][a] / 3 == val["majority_fraction"][s] for s, a in val["majority_answer"].items())
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary leftovers


def test_generation_is_byte_identical(tmp_path):
    a = syn.generate(tmp_path / "a", SMALL, progress=False)
    b = syn.generate(tmp_path / "b", SMALL, progress=False)
    assert a == b
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_ensure_generated_caches_and_regenerates_on_config_change(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    meta = syn.ensure_generated(out, SMALL, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("cached dataset was regenerated")

    with monkeypatch.context() as m:
        m.setattr(syn, "generate", fail)
        assert syn.ensure_generated(out, SMALL, progress=False) == meta
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    changed = SyntheticConfig(**{**syn.asdict(SMALL), "seed": 4, "n_train": 5})
    new_meta = syn.ensure_generated(out, changed, progress=False)
    assert new_meta["config_hash"] != meta["config_hash"]
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train-000000.tar", "val-000000.tar",
                                                     "val-000001.tar", "val-000002.tar"]
    assert syn.load_meta(out, SMALL) is None and syn.load_meta(out, changed) == new_meta


def test_missing_shard_triggers_regeneration(tmp_path):
    out = tmp_path / "ds"
    syn.ensure_generated(out, SMALL, progress=False)
    (out / "train-000001.tar").unlink()
    assert syn.load_meta(out, SMALL) is None
    syn.ensure_generated(out, SMALL, progress=False)
    assert (out / "train-000001.tar").is_file()


def test_interrupted_generation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    calls = 0
    real_render = syn.render

    def render_then_crash(scene):
        nonlocal calls
        calls += 1
        if calls == 20:
            raise KeyboardInterrupt
        return real_render(scene)

    monkeypatch.setattr(syn, "render", render_then_crash)
    with pytest.raises(KeyboardInterrupt):
        syn.ensure_generated(out, SMALL, progress=False)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ds.lock"]
    monkeypatch.setattr(syn, "render", real_render)
    assert syn.ensure_generated(out, SMALL, progress=False)["splits"]["train"]["num_samples"] == 30


def test_refuses_to_replace_foreign_directory(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        syn.ensure_generated(out, SMALL, progress=False)
    assert (out / "notes.txt").read_text() == "mine"


def _ensure_in_child(out):
    syn.ensure_generated(out, SMALL, progress=False)


def test_concurrent_callers_generate_once(tmp_path, monkeypatch):
    out, counter = tmp_path / "ds", tmp_path / "generations.txt"
    real_generate = syn.generate

    def counting_generate(*args, **kwargs):
        with open(counter, "a") as f:
            f.write("x\n")
        time.sleep(0.3)  # make sure the other callers arrive while this one holds the lock
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(syn, "generate", counting_generate)  # inherited by the forked children
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_ensure_in_child, args=(out,)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert counter.read_text() == "x\n"
    assert syn.load_meta(out, SMALL) is not None


def test_cli(tmp_path, capsys):
    syn.main(["--out", str(tmp_path / "cli"), "--n-train", "4", "--n-val", "6", "--no-progress"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"] == 4 and summary["val"] == 6
    assert Path(summary["meta"]).is_file()
