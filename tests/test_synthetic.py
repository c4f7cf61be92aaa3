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


def obj(shape, color, quadrant, size=64):
    """An object where the generator puts it: fixed size, centred in its quadrant."""
    half, side = size // 2, syn.object_side(size)
    qx, qy = syn.quadrant_origin(quadrant, size)
    x0, y0 = qx + (half - side) // 2, qy + (half - side) // 2
    return SceneObject(shape, color, quadrant, (x0, y0, x0 + side, y0 + side))


def dot(color, size=64):
    x0, y0 = syn.dot_spot(size)
    side = syn.dot_side(size)
    return Dot(color, (x0, y0, x0 + side, y0 + side))


@pytest.fixture
def scene():
    """red circle (top left), blue square (top right), red triangle (bottom right), cyan dot."""
    objects = (obj("circle", "red", 0), obj("square", "blue", 1), obj("triangle", "red", 3))
    return Scene(64, objects, dot("cyan"))


def read_samples(out_dir, shards):
    return list(wds.WebDataset([str(Path(out_dir) / s) for s in shards], shardshuffle=False))


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    "question, expected",
    [
        (Question("exist", ("red",)), "yes"),
        (Question("exist", ("blue",)), "yes"),
        (Question("exist", ("yellow",)), "no"),
        (Question("exist", ("green",)), "no"),
        (Question("color", ("top right",)), "blue"),
        (Question("color", ("bottom right",)), "red"),
        (Question("shape", ("top left",)), "circle"),
        (Question("shape", ("bottom right",)), "triangle"),
        (Question("count", ()), "three"),
        (Question("relation", ("top left", "bottom right", "color")), "yes"),
        (Question("relation", ("top left", "top right", "color")), "no"),
        (Question("relation", ("top left", "bottom right", "shape")), "no"),
        (Question("relation", ("bottom right", "top right", "shape")), "no"),
        (Question("fine", ()), "cyan"),
    ],
)
def test_answer_on_hand_built_scene(scene, question, expected):
    assert answer(scene, question) == expected


@pytest.mark.parametrize(
    "question",
    [
        Question("color", ("bottom left",)),  # empty quadrant
        Question("shape", ("bottom left",)),
        Question("relation", ("top left", "bottom left", "color")),  # one place is empty
        Question("relation", ("top left", "top left", "shape")),  # one object with itself
        Question("size", ()),  # unknown skill
    ],
)
def test_ill_posed_questions_raise(scene, question):
    with pytest.raises(ValueError):
        answer(scene, question)


def test_count_and_same_attribute_relations_on_a_full_scene():
    objects = tuple(obj("square", c, q) for q, c in enumerate(("red", "red", "blue", "yellow")))
    scene = Scene(64, objects, dot("white"))
    assert answer(scene, Question("count")) == "four"
    assert answer(scene, Question("relation", ("top left", "top right", "color"))) == "yes"
    assert answer(scene, Question("relation", ("bottom left", "bottom right", "shape"))) == "yes"
    assert answer(scene, Question("relation", ("bottom left", "bottom right", "color"))) == "no"
    rng = random.Random(0)
    relations = {syn.sample_question(rng, scene, "relation") for _ in range(200)}
    assert {answer(scene, q) for q in relations} == {"yes", "no"}
    assert {q.args[2] for q in relations} == {"color", "shape"}
    assert all(q.args[0] != q.args[1] for q in relations)


def test_single_object_scene_has_no_relation_question():
    scene = Scene(64, (obj("circle", "green", 2),), dot("orange"))
    assert syn.sample_question(random.Random(0), scene, "relation") is None
    assert answer(scene, Question("shape", ("bottom left",))) == "circle"
    assert answer(scene, Question("color", ("bottom left",))) == "green"
    assert answer(scene, Question("count")) == "one"
    questions = syn.sample_turns(random.Random(0), scene, 6)
    assert len(questions) == len(set(questions)) == 6
    assert "relation" not in {q.skill for q in questions}


def test_question_text_is_clean():
    for text in syn.all_texts(SMALL):
        assert text == text.lower() and text == text.strip()
        assert "?" not in text or text.endswith(" ?")
    assert "do the objects in the top left and the bottom right have the same color ?" in syn.all_texts()
    assert "is there a red object ?" in syn.all_texts()
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
    assert 0.45 < answers["exist"]["yes"] / answers["exist"].total() < 0.55
    # "same attribute" needs a matching pair, which small scenes often lack: yes stays a minority
    assert 0.25 < answers["relation"]["yes"] / answers["relation"].total() < 0.55
    for skill in ("color", "shape", "count", "fine"):
        assert set(answers[skill]) == set(syn.ANSWER_VOCAB[skill])
        assert max(answers[skill].values()) / answers[skill].total() < 0.4


def test_all_texts_cover_every_sampled_text():
    vocab = set(syn.all_texts(SMALL))
    rng = random.Random(1)
    for _ in range(300):
        scene = syn.sample_scene(rng, 64)
        for q in syn.sample_turns(rng, scene, 6):
            assert q.text in vocab and answer(scene, q) in vocab
        assert set(syn.describe(scene).split()) <= {w for t in vocab for w in t.split()}


# --------------------------------------------------------------------------- scenes and images


@pytest.mark.parametrize("size", [64, 96, 128])
def test_objects_centred_in_distinct_quadrants_and_dot_tiny_and_separate(size):
    rng = random.Random(size)
    half, side = size // 2, syn.object_side(size)
    for _ in range(500):
        scene = syn.sample_scene(rng, size)
        assert 1 <= len(scene.objects) <= 4
        assert len({o.quadrant for o in scene.objects}) == len(scene.objects)
        for o in scene.objects:
            qx, qy = syn.quadrant_origin(o.quadrant, size)
            x0, y0, x1, y1 = o.box
            assert qx <= x0 < x1 <= qx + half and qy <= y0 < y1 <= qy + half
            assert x1 - x0 == y1 - y0 == side
            assert abs((x0 - qx) - (qx + half - x1)) <= 1  # centred
        x0, y0, x1, y1 = scene.dot.box
        assert (x0, y0) == syn.dot_spot(size)
        assert size != 64 or (x0 // 4 == (x1 - 1) // 4 and y0 // 4 == (y1 - 1) // 4)  # inside one 4x4 patch
        assert x1 - x0 == y1 - y0 == syn.dot_side(size)
        assert size > 64 or x1 - x0 < 4  # smaller than a 4x4 patch at the default size
        assert 0 <= x0 and x1 <= size and 0 <= y0 and y1 <= size
        assert not any(syn.boxes_touch(scene.dot.box, o.box, gap=1) for o in scene.objects)


def test_render_draws_objects_and_dot(scene):
    img = syn.render(scene)
    assert img.size == (64, 64) and img.mode == "RGB"
    x0, y0, x1, y1 = scene.dot.box
    assert img.getpixel((x0, y0)) == img.getpixel((x1 - 1, y1 - 1)) == syn.DOT_COLORS["cyan"]
    assert img.getpixel((x1, y1)) == syn.BACKGROUND
    circle, square, _ = scene.objects
    cx, cy = (circle.box[0] + circle.box[2]) // 2, (circle.box[1] + circle.box[3]) // 2
    assert img.getpixel((cx, cy)) == syn.COLORS["red"]  # centre of the circle
    assert img.getpixel((circle.box[0], circle.box[1])) == syn.BACKGROUND  # a circle has no corners
    assert img.getpixel((square.box[0], square.box[1])) == syn.COLORS["blue"]  # a square does
    assert img.getpixel((0, 0)) == syn.BACKGROUND


# --------------------------------------------------------------------------- records


def test_records_format():
    for index in range(20):
        _, record = syn.make_sample(SMALL, "train", index)
        turns = record["conversations"]
        n_turns = SMALL.turns_per_image + 1  # the questions, then the description
        assert record["id"] == f"train-{index:06d}"
        assert len(turns) == 2 * n_turns == 2 * len(record["skills"])
        assert [t["from"] for t in turns] == ["human", "gpt"] * n_turns
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        assert record["skills"][-1] == "describe" and turns[-2]["value"] == syn.DESCRIBE_PROMPT
        questions = [turns[0]["value"][8:]] + [t["value"] for t in turns[2:-2:2]]
        assert len(set(questions)) == SMALL.turns_per_image
        assert all(" " not in t["value"] for t in turns[1:-2:2])  # one-word answers
        # skills come in rounds of TRAIN_ROUND (drawn without replacement; the slow skills twice)
        counts = Counter(record["skills"][:-1])
        assert all(counts[k] <= syn.TRAIN_ROUND.count(k) for k in counts)
    _, plain = syn.make_sample(SyntheticConfig(**{**syn.asdict(SMALL), "describe": False}), "train", 0)
    assert "describe" not in plain["skills"]


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
        counts = Counter((sk, t["value"]) for r in records for sk, t in zip(r["skills"], r["conversations"][1::2])
                         if sk != "describe")
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


def _read_own_samples(root, n_train, n_val, barrier, results):
    """Prepares the shared cache for one config, waits until the other process has prepared its own,
    then reads every sample its shard lists name."""
    from data.sources import SyntheticSource

    source = SyntheticSource(str(root), **{**syn.asdict(SMALL), "n_train": n_train, "n_val": n_val})
    shards = source.prepare()
    barrier.wait(60)
    keys = {split: [s["__key__"] for s in wds.tarfile_samples({"url": u} for u in urls)]
            for split, urls in (("train", shards.train), ("val", shards.val))}
    results.put((n_train, keys))


def test_concurrent_runs_of_different_sizes_each_read_their_own_samples(tmp_path):
    """Two runs sharing one data cache, started together with different sizes: each one trains and
    evaluates on exactly the samples of its own config (one used to rewrite the other's shards)."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    sizes = [(20, 6), (30, 12)]
    procs = [ctx.Process(target=_read_own_samples, args=(tmp_path, n_train, n_val, barrier, results))
             for n_train, n_val in sizes]
    for p in procs:
        p.start()
    seen = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    for n_train, n_val in sizes:
        assert seen[n_train]["train"] == [f"train-{i:06d}" for i in range(n_train)]
        assert seen[n_train]["val"] == [f"val-{i:06d}" for i in range(n_val)]
    assert len(list(tmp_path.glob("synthetic-s3-*/meta.json"))) == 2


def test_cache_dir_is_keyed_on_every_generation_parameter_and_the_format_version(tmp_path, monkeypatch):
    base = syn.cache_dir(tmp_path, SMALL)
    changed = {"seed": 4, "n_train": 31, "n_val": 19, "image_size": 96, "turns_per_image": 5, "describe": False,
               "samples_per_shard": 9, "canvas_widths": (64, 96)}
    assert set(changed) == set(syn.asdict(SMALL))  # a new field must be added here (and is hashed)
    dirs = {syn.cache_dir(tmp_path, SyntheticConfig(**{**syn.asdict(SMALL), k: v})) for k, v in changed.items()}
    assert base not in dirs and len(dirs) == len(changed)
    monkeypatch.setattr(syn, "FORMAT_VERSION", syn.FORMAT_VERSION + 1)
    assert syn.cache_dir(tmp_path, SMALL) != base


def test_canvas_widths_pad_the_same_scene_to_per_sample_widths(tmp_path):
    """The high-resolution variant (data=synthetic_hires): each sample's scene is centred on a canvas of
    one of `canvas_widths`, drawn from its own stream, so scenes and questions stay those of the plain task."""
    wide = SyntheticConfig(**{**syn.asdict(SMALL), "canvas_widths": (64, 96)})
    seen = set()
    for index in range(12):
        scene, record = syn.make_sample(wide, "train", index)
        plain_scene, plain_record = syn.make_sample(SMALL, "train", index)
        assert scene == plain_scene and record == plain_record
        image = syn.canvas(wide, "train", index, syn.render(scene))
        assert image.height == 64 and image.width in (64, 96)
        seen.add(image.width)
        left = (image.width - 64) // 2
        assert list(image.crop((left, 0, left + 64, 64)).getdata()) == list(syn.render(scene).getdata())
    assert seen == {64, 96}
    with pytest.raises(ValueError, match="canvas_widths"):
        SyntheticConfig(**{**syn.asdict(SMALL), "canvas_widths": (32,)})
