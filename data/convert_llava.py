"""Convert a LLaVA instruction JSON plus its image folder into WebDataset shards.

    python -m data.convert_llava --json llava_v1_5_mix665k.json --images IMAGE_ROOT --out OUT_DIR \
        [--samples-per-shard 1000] [--prefix train] [--max-samples N] [--allow-outside-images]

Why shards: hundreds of thousands of small image files are slow to read from network file
systems; sequential tar shards stream well and split cleanly across workers and nodes.

Each sample has ``__key__`` (the record index, ``%09d``), ``json`` (the record unchanged) and the
original image bytes under the image's extension (``jpg``, ``png``, ...; never re-encoded).
Text-only records get only ``json``. Records whose image is missing or unreadable are skipped and
reported, and so are image paths that could leave ``--images`` (absolute, or with a ``..`` part)
unless ``--allow-outside-images`` is given: the JSON may come from anywhere, and its paths must not
copy arbitrary files of this machine into shards. Shard k always holds records [k*S, (k+1)*S) of the
input, so a rerun of the same command skips the shards recorded in ``OUT/<prefix>-progress.json`` and
continues where it stopped; a finished shard is written again when an image it lacked is now there.
Progress and reports are named by ``--prefix``, so train and val conversions can share ``OUT``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter

MAX_REPORTED_MISSING = 20


class ConversionError(Exception):
    """Bad input; the message names the file (and record) at fault."""


@dataclass
class ShardResult:
    name: str
    start: int  # first input record index of this shard
    stop: int  # one past the last input record index
    samples: int = 0  # written samples (text-only included)
    text_only: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)  # paths that could leave the image folder (refused)


# --------------------------------------------------------------------------- input


def load_records(json_path: str | Path, max_samples: int | None = None) -> list[dict]:
    """The input records, checked up front so that bad input fails before anything is written."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise ConversionError(f"{json_path}: file not found")
    try:
        with open(json_path, encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{json_path}: invalid JSON ({e})") from e
    if not isinstance(records, list):
        raise ConversionError(f"{json_path}: expected a JSON list of records, got {type(records).__name__}")
    if max_samples is not None:
        records = records[:max_samples]
    for index, record in enumerate(records):
        check_record(record, index, json_path)
    return records


def check_record(record: object, index: int, json_path: Path) -> None:
    where = f"{json_path}: record {index}"
    if not isinstance(record, dict):
        raise ConversionError(f"{where} is not an object")
    where += f" (id={record.get('id')!r})"
    if not isinstance(record.get("conversations"), list) or not record["conversations"]:
        raise ConversionError(f"{where} has no 'conversations' list")
    if record.get("image") is not None and not isinstance(record["image"], str):
        raise ConversionError(f"{where}: 'image' must be a single path string, got {record['image']!r}")


def stays_inside(rel_path: str) -> bool:
    """True for a relative path without a ``..`` part, which cannot leave the image folder. (Symbolic
    links inside the folder are followed: image folders are often assembled from links.)"""
    path = Path(rel_path)
    return not path.is_absolute() and ".." not in path.parts


def read_image(images_root: Path, rel_path: str) -> tuple[str, bytes | None, str]:
    """(status, original bytes, extension) with status "ok", "missing" or "corrupt"."""
    path = images_root / rel_path
    if not path.is_file():
        return "missing", None, ""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            image_format = (img.format or "").lower()
            img.verify()
    except Exception:  # PIL raises many exception types for broken files
        return "corrupt", None, ""
    extension = path.suffix.lower().lstrip(".") or {"jpeg": "jpg"}.get(image_format, image_format)
    return "ok", data, extension


# --------------------------------------------------------------------------- shards


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def make_sample(record: dict, index: int, images_root: Path, result: ShardResult, allow_outside: bool = False) -> dict | None:
    """The WebDataset sample of one record, or None (counted in ``result``) when its image is
    missing, corrupt or outside the image folder."""
    sample = {"__key__": f"{index:09d}", "json": json.dumps(record, ensure_ascii=False).encode("utf-8")}
    if record.get("image") is None:
        result.text_only += 1
        return sample
    if allow_outside or stays_inside(record["image"]):
        status, data, extension = read_image(images_root, record["image"])
    else:
        status = "outside"
    if status != "ok":
        getattr(result, status).append(record["image"])
        return None
    sample[extension] = data
    return sample


def write_shard(out_dir: Path, result: ShardResult, records: list[dict], images_root: Path, bar: tqdm,
                allow_outside: bool = False) -> None:
    """Writes records[result.start:result.stop] to a ``.tmp`` file, renamed only when complete.
    Fixed tar metadata (mtime 0) makes a resumed run byte-identical to a clean one."""
    final = out_dir / result.name
    tmp = final.with_name(final.name + ".tmp")
    with open(tmp, "wb") as f, TarWriter(f, encoder=False, mtime=0) as writer:
        for index in range(result.start, result.stop):
            sample = make_sample(records[index], index, images_root, result, allow_outside)
            if sample is not None:
                writer.write(sample)
                result.samples += 1
            bar.update(1)
    os.replace(tmp, final)


# --------------------------------------------------------------------------- progress / reports


def write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def progress_path(out_dir: Path, prefix: str) -> Path:
    return out_dir / f"{prefix}-progress.json"


def completed_shards(out_dir: Path, fingerprint: dict) -> list[ShardResult]:
    """Shards a previous run of the same conversion finished (a prefix whose files still exist)."""
    path = progress_path(out_dir, fingerprint["prefix"])
    if not path.is_file():
        return []
    progress = json.loads(path.read_text(encoding="utf-8"))
    if progress.get("fingerprint") != fingerprint:
        raise ConversionError(
            f"{path} belongs to a different conversion ({progress.get('fingerprint')} != {fingerprint}); "
            "use another --out or --prefix, or delete it to start over"
        )
    done = []
    for entry in progress["shards"]:
        result = ShardResult(**entry)
        if not (out_dir / result.name).is_file():
            break
        done.append(result)
    return done


def can_read_now(result: ShardResult, images_root: Path, allow_outside: bool) -> bool:
    """True when an image that `result` lacked (missing, or refused as outside) is now there to read."""
    lacked = result.missing + result.outside
    return any((allow_outside or stays_inside(p)) and (images_root / p).is_file() for p in lacked)


def save_progress(out_dir: Path, fingerprint: dict, done: list[ShardResult]) -> None:
    next_record = done[-1].stop if done else 0
    write_json_atomic(progress_path(out_dir, fingerprint["prefix"]),
                      {"fingerprint": fingerprint, "next_record": next_record, "shards": [asdict(r) for r in done]})


def write_reports(out_dir: Path, fingerprint: dict, results: list[ShardResult]) -> dict:
    """``<prefix>-manifest.json`` plus the full lists of skipped image paths (``<prefix>-missing_images.txt``, ...)."""
    prefix = fingerprint["prefix"]
    skipped = {kind: [p for r in results for p in getattr(r, kind)] for kind in ("missing", "corrupt", "outside")}
    for kind, paths in skipped.items():
        (out_dir / f"{prefix}-{kind}_images.txt").write_text("".join(p + "\n" for p in paths), encoding="utf-8")
    manifest = {
        **fingerprint,
        "shards": [{"name": r.name, "samples": r.samples, "records": [r.start, r.stop]} for r in results],
        "written": sum(r.samples for r in results),
        "text_only": sum(r.text_only for r in results),
        **{kind: len(paths) for kind, paths in skipped.items()},
        **{f"first_{kind}": paths[:MAX_REPORTED_MISSING] for kind, paths in skipped.items()},
    }
    write_json_atomic(out_dir / f"{prefix}-manifest.json", manifest)
    return manifest


# --------------------------------------------------------------------------- driver


def convert(
    json_path: str | Path,
    images_root: str | Path,
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    prefix: str = "train",
    max_samples: int | None = None,
    progress: bool = True,
    allow_outside_images: bool = False,
) -> dict:
    """Runs (or resumes) the conversion and returns the summary printed by the CLI."""
    started = time.monotonic()
    if samples_per_shard < 1:
        raise ConversionError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    json_path, images_root, out_dir = Path(json_path), Path(images_root), Path(out_dir)
    if not images_root.is_dir():
        raise ConversionError(f"{images_root}: image folder not found")
    records = load_records(json_path, max_samples)
    out_dir.mkdir(parents=True, exist_ok=True)
    # What must match for a rerun to resume: shard boundaries and names depend on exactly these.
    fingerprint = {"source": json_path.name, "num_records": len(records),
                   "samples_per_shard": samples_per_shard, "prefix": prefix}
    done = completed_shards(out_dir, fingerprint)
    resumed = len(done)
    retry = [k for k, r in enumerate(done) if can_read_now(r, images_root, allow_outside_images)]
    starts = range(0, len(records), samples_per_shard)
    initial = (done[-1].stop if done else 0) - sum(done[k].stop - done[k].start for k in retry)
    with tqdm(total=len(records), initial=initial, unit="rec",
              desc=f"{prefix} shards", disable=not progress) as bar:
        for k in [*retry, *range(resumed, len(starts))]:
            result = ShardResult(shard_name(prefix, k), starts[k], min(starts[k] + samples_per_shard, len(records)))
            write_shard(out_dir, result, records, images_root, bar, allow_outside_images)
            done[k:k + 1] = [result]  # replaces a retried shard, appends a new one
            save_progress(out_dir, fingerprint, done)
    if not done:
        save_progress(out_dir, fingerprint, done)
    manifest = write_reports(out_dir, fingerprint, done)
    return {"shards": len(done), "resumed_shards": resumed - len(retry), "retried_shards": len(retry),
            "written": manifest["written"], "text_only": manifest["text_only"], "missing": manifest["missing"],
            "corrupt": manifest["corrupt"], "outside": manifest["outside"], "seconds": round(time.monotonic() - started, 2),
            "first_missing": manifest["first_missing"], "first_outside": manifest["first_outside"],
            "manifest": str(out_dir / f"{prefix}-manifest.json")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="LLaVA JSON + image folder -> WebDataset shards (resumable)")
    parser.add_argument("--json", required=True, help="LLaVA instruction JSON (a list of records)")
    parser.add_argument("--images", required=True, help="root folder the records' 'image' paths are relative to")
    parser.add_argument("--out", required=True, help="output folder for shards and reports")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--prefix", default="train",
                        help="shard name prefix: OUT/{prefix}-%%06d.tar, OUT/{prefix}-manifest.json, ...")
    parser.add_argument("--max-samples", type=int, default=None, help="use only the first N records")
    parser.add_argument("--allow-outside-images", action="store_true",
                        help="also read image paths that are absolute or contain '..' (they may point anywhere)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        summary = convert(args.json, args.images, args.out, args.samples_per_shard, args.prefix,
                          args.max_samples, progress=not args.no_progress, allow_outside_images=args.allow_outside_images)
    except ConversionError as e:
        sys.exit(f"convert_llava: error: {e}")
    json.dump(summary, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
