"""Issue 23 end to end: a file mixing the layouts people convert (tests/llava_layouts.py) converts with
exit 0 and a report naming each skipped record; `python -m train` trains on the shards and evaluates
multi-image samples; `python -m train evaluate` of the export, as a model that takes one image per
sample, skips the multi-image ones with a count and scores an lmms-eval task built from the same
shards (multi-image prompts). Shards written before the rule existed (a record whose reply comes
before its image: evaluation used to die with ImageTokenMismatch) are skipped by reason, not fatal."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds

from tests.llava_layouts import USABLE, gpt, human, write_mixed

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.config.text.num_hidden_layers=2", "model.config.vision.num_hidden_layers=2", "data.num_workers=1",
         "data.batch_size=4", "data.eval_batch_size=6", "data.max_length=1024", "eval.noimage=false", "eval.max_new_tokens=2"]
OLD = [  # what the converter wrote before the rule: usable once, and two it now refuses
    ({"id": "old_ok", "image": "coco/train2017/red.jpg", "conversations": [human("<image>\nColor?"), gpt("red")]}, "jpg"),
    ({"id": "old_reply_first", "image": "coco/train2017/red.jpg", "conversations": [gpt("Hi!"), human("<image>\nColor?")]}, "jpg"),
    ({"id": "old_no_placeholder", "image": "coco/train2017/red.jpg", "conversations": [human("Color?"), gpt("red")]}, "jpg"),
]


def python(*args, timeout=900):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def hydra_list(paths) -> str:
    return "[" + ",".join(str(p) for p in paths) + "]"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """train: the mix twice (CLI conversion); val: every usable layout once; plus one old shard in both."""
    tmp = tmp_path_factory.mktemp("layouts")
    json_path, images, expected = write_mixed(tmp, repeat=2)
    out = tmp / "shards"
    proc = python("-m", "data.convert_llava", "--json", str(json_path), "--images", str(images), "--out", str(out),
                  "--samples-per-shard", "16", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    val_json = tmp / "val.json"
    val_json.write_text(json.dumps([r for r, _ in USABLE]))
    val = python("-m", "data.convert_llava", "--json", str(val_json), "--images", str(images), "--out", str(out),
                 "--prefix", "val", "--no-progress")
    assert val.returncode == 0 and json.loads(val.stdout)["written"] == len(USABLE), val.stderr[-3000:]
    old = out / "old-000000.tar"
    with wds.TarWriter(str(old)) as w:
        for k, (record, ext) in enumerate(OLD):
            w.write({"__key__": f"{k:09d}", "json": json.dumps(record).encode(), ext: (images / record["image"]).read_bytes()})
    manifest = lambda prefix: json.loads((out / f"{prefix}-manifest.json").read_text())
    return {
        "root": tmp, "summary": summary, "expected": expected, "report": out / "train-skipped.jsonl",
        "train": [out / s["name"] for s in manifest("train")["shards"]] + [old],
        "val": [out / s["name"] for s in manifest("val")["shards"]] + [old],
    }


def test_the_mix_converts_with_exit_0_and_names_each_skipped_record(shards):
    skipped = [(i, r.get("id") if isinstance(r, dict) else None, n) for i, (r, n) in enumerate(shards["expected"]) if isinstance(n, str)]
    report = [json.loads(line) for line in shards["report"].read_text().splitlines()]
    assert [(e["index"], e["id"], e["reason"]) for e in report] == skipped
    assert shards["summary"]["skipped_records"] == len(skipped) and shards["summary"]["multi_image"] == 4


@pytest.fixture(scope="module")
def trained(shards):
    root = shards["root"]
    proc = python("-m", "train", "data=shards", f"data.source.train={hydra_list(shards['train'])}",
                  f"data.source.val={hydra_list(shards['val'])}", f"paths.root_dir={root}", "run_name=layouts",
                  "trainer.max_steps=4", "trainer.val_check_interval=4", *SMALL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (run,) = (root / "outputs" / "layouts").iterdir()
    return run, proc


def test_training_and_its_evaluation_run_on_the_shards_with_skips_counted_by_reason(trained):
    run, proc = trained
    summary = json.loads((run / "metrics.json").read_text())
    m = summary["metrics"]
    assert summary["steps"] == 4 and "val/acc" in m and "train/loss" in m
    assert m["val/n_samples"] == len(USABLE) + 1  # every usable layout, multi-image ones included, and old_ok
    reasons = {k.removeprefix("data/skipped_samples/"): v for k, v in m.items() if k.startswith("data/skipped_samples/")}
    assert reasons.get("no_assistant_reply", 0) >= 1 and reasons.get("image_placeholder_mismatch", 0) >= 1  # the old shard
    assert sum(reasons.values()) == m["data/skipped_samples"]
    assert "skipped:" in proc.stdout and "no_assistant_reply" in proc.stdout


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval is not installed")
def test_evaluation_as_a_one_image_model_skips_multi_image_samples_and_lmms_eval_scores_them(shards, trained, tmp_path):
    from train.lmms.tasks.shards import write_shards_task

    task = write_shards_task(tmp_path / "task", [str(p) for p in shards["val"]], name="layouts_val")
    assert task["documents"] == len(USABLE) + 1 and task["skipped"] == {"no_assistant_reply": 1, "image_placeholder_mismatch": 1}
    docs = [json.loads(line) for line in (tmp_path / "task" / "layouts_val.jsonl").read_text().splitlines()]
    assert sorted(len(d["images"]) for d in docs) == sorted([n for _, n in USABLE] + [1])
    spread = next(d for d in docs if len(d["images"]) == 3)
    assert spread["question"] == "Picture 1: <image>\nPicture 2: <image>\nPicture 3: <image>\nName the colors in order."

    run, _ = trained
    proc = python("-m", "train", "evaluate", f"model.pretrained={run / 'export'}", "model.max_images_per_sample=1", "data=shards",
                  f"data.source.train={hydra_list(shards['train'])}", f"data.source.val={hydra_list(shards['val'])}",
                  f"paths.root_dir={tmp_path}", *SMALL, "eval.lmms_tasks=[layouts_val]",
                  f"eval.lmms_include_path={task['include_path']}", "eval.lmms_batch_size=4")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (metrics_file,) = (tmp_path / "outputs" / "eval").glob("*/*/metrics.json")
    m = json.loads(metrics_file.read_text())["metrics"]
    multi = sum(n > 1 for _, n in USABLE)
    assert m["val/n_samples"] == len(USABLE) + 1 - multi
    assert (m["data/skipped_samples/too_many_images"], m["data/skipped_samples/no_assistant_reply"],
            m["data/skipped_samples/image_placeholder_mismatch"], m["data/skipped_samples"]) == (multi, 1, 1, multi + 2)
    assert 0 <= m["bench/layouts_val/exact_match"] <= 1
