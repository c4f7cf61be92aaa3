"""LLaVA JSON -> WebDataset conversion: contents, skipped records, reports, resume, errors, and the
layouts people convert (tests/llava_layouts.py): every record written or skipped as expected."""

import json
import sys
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image


from data import convert_llava as cl  # noqa: E402
from data.pipeline import parse_record
from tests.llava_layouts import COLORS, write_mixed


def turns(question):
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "an answer"}]


@pytest.fixture
def llava(tmp_path):
    """8 records in shards of 3: [ok jpg, text-only, missing] [ok png, corrupt, ok JPG]
    [truncated png, ok jpg]."""
    root = tmp_path / "images"
    (root / "coco").mkdir(parents=True)
    (root / "gqa").mkdir()
    Image.new("RGB", (16, 12), (200, 10, 10)).save(root / "coco" / "a.jpg", quality=90)
    Image.new("RGB", (8, 8), (10, 200, 10)).save(root / "gqa" / "b.png")
    Image.new("RGB", (9, 9), (10, 10, 200)).save(root / "coco" / "c.JPG", format="JPEG")
    Image.new("L", (10, 10), 128).save(root / "coco" / "e.jpg")
    (root / "coco" / "bad.jpg").write_bytes(b"this is not an image")
    png = (root / "gqa" / "b.png").read_bytes()
    (root / "gqa" / "truncated.png").write_bytes(png[: len(png) // 2])
    records = [
        {"id": "a", "image": "coco/a.jpg", "conversations": turns("what is red ?")},
        {"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"id": "m", "image": "coco/missing.jpg", "conversations": turns("lost ?")},
        {"id": "b", "image": "gqa/b.png", "conversations": turns("green ?")},
        {"id": "x", "image": "coco/bad.jpg", "conversations": turns("bad ?")},
        {"id": "c", "image": "coco/c.JPG", "conversations": turns("blue ?")},
        {"id": "p", "image": "gqa/truncated.png", "conversations": turns("half ?")},
        {"id": "e", "image": "coco/e.jpg", "conversations": turns("grey ?")},
    ]
    json_path = tmp_path / "llava.json"
    json_path.write_text(json.dumps(records))
    return json_path, root, records


def run(json_path, root, out, **kwargs):
    return cl.convert(json_path, root, out, samples_per_shard=3, progress=False, **kwargs)


def read_dir(out):
    return {p.name: p.read_bytes() for p in sorted(Path(out).iterdir())}


def test_shards_contents_and_reports(llava, tmp_path):
    json_path, root, records = llava
    out = tmp_path / "out"
    summary = run(json_path, root, out)
    assert summary["shards"] == 3 and summary["resumed_shards"] == 0
    assert (summary["written"], summary["missing"], summary["corrupt"]) == (5, 1, 2)
    assert summary["first_missing"] == ["coco/missing.jpg"]

    manifest = json.loads((out / "train-manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [s["samples"] for s in manifest["shards"]] == [2, 2, 1]
    assert [s["records"] for s in manifest["shards"]] == [[0, 3], [3, 6], [6, 8]]
    assert (manifest["written"], manifest["text_only"], manifest["missing"], manifest["corrupt"]) == (5, 1, 1, 2)
    assert (out / "train-missing_images.txt").read_text() == "coco/missing.jpg\n"
    assert (out / "train-corrupt_images.txt").read_text() == "coco/bad.jpg\ngqa/truncated.png\n"
    assert not list(out.glob("*.tmp"))

    urls = [str(out / s["name"]) for s in manifest["shards"]]
    samples = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}
    assert sorted(samples) == ["000000000", "000000001", "000000003", "000000005", "000000007"]
    for key, sample in samples.items():
        assert json.loads(sample["json"]) == records[int(key)]
    assert samples["000000000"]["jpg"] == (root / "coco" / "a.jpg").read_bytes()  # original bytes
    assert samples["000000003"]["png"] == (root / "gqa" / "b.png").read_bytes()
    assert samples["000000005"]["jpg"] == (root / "coco" / "c.JPG").read_bytes()  # lower-cased key
    assert [k for k in samples["000000001"] if not k.startswith("__")] == ["json"]  # text-only


def test_decoded_images_match(llava, tmp_path):
    json_path, root, _ = llava
    run(json_path, root, tmp_path / "out")
    ds = wds.WebDataset(str(tmp_path / "out" / "train-000001.tar"), shardshuffle=False).decode("pil")
    first = next(iter(ds))
    assert first["png"].size == (8, 8) and first["png"].getpixel((0, 0)) == (10, 200, 10)


def test_resume_after_interruption_matches_clean_run(llava, tmp_path, monkeypatch):
    json_path, root, _ = llava
    run(json_path, root, tmp_path / "clean")

    out = tmp_path / "resumed"
    real_read_image = cl.read_image

    def crash_on_corrupt(images_root, rel_path):
        if rel_path == "coco/bad.jpg":  # record 4, inside shard 1
            raise KeyboardInterrupt
        return real_read_image(images_root, rel_path)

    with monkeypatch.context() as m:
        m.setattr(cl, "read_image", crash_on_corrupt)
        with pytest.raises(KeyboardInterrupt):
            run(json_path, root, out)
    assert (out / "train-000000.tar").is_file() and (out / "train-000001.tar.tmp").is_file()
    assert not (out / "train-000001.tar").exists() and not (out / "train-manifest.json").exists()
    progress = json.loads((out / "train-progress.json").read_text())
    assert [s["name"] for s in progress["shards"]] == ["train-000000.tar"] and progress["next_record"] == 3
    first_shard_stamp = (out / "train-000000.tar").stat().st_mtime_ns

    summary = run(json_path, root, out)
    assert summary["resumed_shards"] == 1 and summary["missing"] == 1 and summary["written"] == 5
    assert (out / "train-000000.tar").stat().st_mtime_ns == first_shard_stamp  # not rewritten
    assert read_dir(out) == read_dir(tmp_path / "clean")


def test_rerun_of_finished_conversion_writes_no_shard(llava, tmp_path):
    json_path, root, _ = llava
    out = tmp_path / "out"
    first = run(json_path, root, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = run(json_path, root, out)
    assert again["resumed_shards"] == 3
    assert {k: v for k, v in again.items() if k not in ("seconds", "resumed_shards")} == \
        {k: v for k, v in first.items() if k not in ("seconds", "resumed_shards")}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == stamps


def test_deleted_shard_is_rewritten(llava, tmp_path):
    json_path, root, _ = llava
    out = tmp_path / "out"
    run(json_path, root, out)
    expected = read_dir(out)
    (out / "train-000001.tar").unlink()
    assert run(json_path, root, out)["resumed_shards"] == 1
    assert read_dir(out) == expected


def test_progress_of_a_different_conversion_is_refused(llava, tmp_path):
    json_path, root, _ = llava
    out = tmp_path / "out"
    run(json_path, root, out)
    with pytest.raises(cl.ConversionError, match="different conversion"):
        cl.convert(json_path, root, out, samples_per_shard=2, progress=False)


def test_max_samples_and_prefix(llava, tmp_path):
    json_path, root, _ = llava
    summary = run(json_path, root, tmp_path / "out", max_samples=4, prefix="trial")
    assert summary["shards"] == 2 and summary["written"] == 3
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["trial-000000.tar", "trial-000001.tar"]


def test_image_paths_that_leave_the_image_folder_are_refused_unless_allowed(tmp_path, capsys):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "ok.png")
    Image.new("RGB", (8, 8), (4, 5, 6)).save(tmp_path / "secret.png")  # beside the image folder, not in it
    outside = ["../secret.png", str(tmp_path / "secret.png"), "sub/../../secret.png"]
    records = [{"id": "ok", "image": "ok.png", "conversations": turns("q")}]
    records += [{"id": f"o{i}", "image": path, "conversations": turns("q")} for i, path in enumerate(outside)]
    json_path = tmp_path / "in.json"
    json_path.write_text(json.dumps(records))

    refused = run(json_path, root, tmp_path / "out")
    assert (refused["written"], refused["outside"], refused["missing"]) == (1, 3, 0)
    assert refused["first_outside"] == outside
    assert (tmp_path / "out" / "train-outside_images.txt").read_text().splitlines() == outside
    shard = (tmp_path / "out" / "train-000000.tar").read_bytes()
    assert (tmp_path / "secret.png").read_bytes() not in shard

    cl.main(["--json", str(json_path), "--images", str(root), "--out", str(tmp_path / "allowed"), "--no-progress",
             "--allow-outside-images"])
    allowed = json.loads(capsys.readouterr().out)
    assert (allowed["written"], allowed["outside"]) == (4, 0)


def test_train_and_val_share_an_output_folder(llava, tmp_path):
    json_path, root, _ = llava
    out = tmp_path / "out"
    train = run(json_path, root, out, prefix="train")
    val = run(json_path, root, out, prefix="val", max_samples=3)
    assert (train["written"], val["written"]) == (5, 2)
    for prefix, shards in (("train", 3), ("val", 1)):
        manifest = json.loads((out / f"{prefix}-manifest.json").read_text())
        assert [s["name"] for s in manifest["shards"]] == [f"{prefix}-{k:06d}.tar" for k in range(shards)]
    assert run(json_path, root, out, prefix="train")["resumed_shards"] == 3  # each resumes its own progress
    assert run(json_path, root, out, prefix="val", max_samples=3)["resumed_shards"] == 1


def test_rerun_retries_images_restored_since_the_last_run(llava, tmp_path):
    json_path, root, _ = llava
    out = tmp_path / "out"
    assert run(json_path, root, out)["missing"] == 1
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    Image.new("RGB", (8, 8), (9, 9, 9)).save(root / "coco" / "missing.jpg")  # restored

    again = run(json_path, root, out)
    assert (again["missing"], again["written"], again["retried_shards"], again["resumed_shards"]) == (0, 6, 1, 2)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} != stamps
    run(json_path, root, tmp_path / "clean")
    assert read_dir(out) == read_dir(tmp_path / "clean")
    assert run(json_path, root, out)["retried_shards"] == 0  # nothing left to retry: no shard is rewritten


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "file not found"),
        ("{not json", "invalid JSON"),
        ('{"id": 1}', "expected a JSON list"),
    ],
)
def test_clear_errors(tmp_path, content, message):
    json_path = tmp_path / "in.json"
    if content is not None:
        json_path.write_text(content)
    with pytest.raises(cl.ConversionError, match=message) as info:
        cl.convert(json_path, tmp_path, tmp_path / "out", progress=False)
    assert str(json_path) in str(info.value)


def test_cli(llava, tmp_path, capsys):
    json_path, root, _ = llava
    out = tmp_path / "out"
    cl.main(["--json", str(json_path), "--images", str(root), "--out", str(out),
             "--samples-per-shard", "5", "--no-progress"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards"] == 2 and summary["written"] == 5 and summary["missing"] == 1
    assert summary["manifest"] == str(out / "train-manifest.json")
    with pytest.raises(SystemExit, match="file not found"):
        cl.main(["--json", str(tmp_path / "nope.json"), "--images", str(root), "--out", str(out)])


def test_real_layouts_convert_and_every_skipped_record_is_reported(tmp_path, capsys):
    """LLaVA-1.5 665k, ShareGPT4V, OneVision multi-image, system turns, user/assistant, an opening
    assistant turn: written; every unusable kind: skipped, counted by reason and listed in the report
    (index, id, reason) while the conversion exits normally."""
    json_path, root, expected = write_mixed(tmp_path)
    out = tmp_path / "out"
    cl.main(["--json", str(json_path), "--images", str(root), "--out", str(out), "--samples-per-shard", "7", "--no-progress"])
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    usable = [(i, r, n) for i, (r, n) in enumerate(expected) if isinstance(n, int)]
    skipped = [(i, r, n) for i, (r, n) in enumerate(expected) if isinstance(n, str)]
    assert (summary["records"], summary["written"], summary["skipped_records"]) == (len(expected), len(usable), len(skipped))
    assert summary["text_only"] == sum(n == 0 for _, _, n in usable) == 1
    assert summary["multi_image"] == sum(n > 1 for _, _, n in usable) == 2
    counts = {}
    for _, _, reason in skipped:
        counts[reason] = counts.get(reason, 0) + 1
    assert summary["skipped"] == counts and len(counts) == 12
    assert f"skipped {len(skipped)} of {len(expected)} records" in captured.err and summary["skipped_report"] in captured.err

    report = [json.loads(line) for line in (out / "train-skipped.jsonl").read_text().splitlines()]
    assert [(e["index"], e["id"], e["reason"]) for e in report] == \
        [(i, r.get("id") if isinstance(r, dict) else None, n) for i, r, n in skipped]
    assert all(e["detail"] for e in report)
    manifest = json.loads((out / "train-manifest.json").read_text())
    assert manifest["skipped"] == counts and manifest["skipped_report"] == "train-skipped.jsonl"
    assert (out / "train-missing_images.txt").read_text().split() == ["coco/train2017/lost.jpg", "onevision/lost.png"]

    urls = [str(out / s["name"]) for s in manifest["shards"]]
    samples = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}
    assert sorted(samples) == [f"{i:09d}" for i, _, _ in usable]
    for i, record, n in usable:
        sample = samples[f"{i:09d}"]
        assert json.loads(sample["json"]) == record
        members = sorted(k for k in sample if not k.startswith("__") and k != "json")
        paths = [record["image"]] if isinstance(record.get("image"), str) else record.get("image", [])
        assert members == ([Path(paths[0]).suffix[1:]] if n == 1 else [f"{k}{Path(p).suffix}" for k, p in enumerate(paths)])
        images = parse_record(sample).images  # what training reads back: the images in placeholder order
        assert images == [(root / p).read_bytes() for p in paths]


def test_strict_stops_at_the_first_unusable_record(tmp_path):
    json_path, root, expected = write_mixed(tmp_path)
    first = next(i for i, (_, n) in enumerate(expected) if isinstance(n, str))
    with pytest.raises(cl.ConversionError, match=rf"record {first} \(id='empty'\).*no_conversations.*--strict"):
        cl.convert(json_path, root, tmp_path / "out", samples_per_shard=100, progress=False, strict=True)
    assert not list((tmp_path / "out").glob("*.tar*"))  # the incomplete shard is not left behind
    with pytest.raises(SystemExit, match="no_conversations"):
        cl.main(["--json", str(json_path), "--images", str(root), "--out", str(tmp_path / "out"), "--strict", "--no-progress"])


def test_a_multi_image_record_with_one_image_missing_lists_every_missing_path(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (8, 8), COLORS["red"]).save(root / "a.png")
    record = {"id": "m", "image": ["gone1.png", "a.png", "gone2.jpg"],
              "conversations": [{"from": "human", "value": "<image><image><image>\nq"}, {"from": "gpt", "value": "a"}]}
    json_path = tmp_path / "in.json"
    json_path.write_text(json.dumps([record]))
    summary = run(json_path, root, tmp_path / "out")
    assert summary["skipped"] == {"missing_image": 1} and summary["first_missing"] == ["gone1.png", "gone2.jpg"]
    (entry,) = [json.loads(line) for line in (tmp_path / "out" / "train-skipped.jsonl").read_text().splitlines()]
    assert entry["reason"] == "missing_image" and "gone1.png" in entry["detail"] and "1 more" in entry["detail"]
    for name in ("gone1.png", "gone2.jpg"):
        Image.new("RGB", (8, 8), COLORS["blue"]).save(root / name)
    again = run(json_path, root, tmp_path / "out")  # restored: the shard is written again, now with the sample
    assert (again["retried_shards"], again["written"], again["multi_image"], again["skipped"]) == (1, 1, 1, {})
