"""Convert a LLaVA instruction JSON plus its image folder into WebDataset shards.

    python -m data.convert_llava --json llava_v1_5_mix665k.json --images IMAGE_ROOT --out OUT_DIR \
        [--samples-per-shard 1000] [--prefix train] [--max-samples N] [--allow-outside-images] [--strict] \
        [--video-fps 2 | --video-frames N] [--video-max-pixels 602112]

Why shards: hundreds of thousands of small image files are slow to read from network file
systems; sequential tar shards stream well and split cleanly across workers and nodes.

Each sample has ``__key__`` (the record index, ``%09d``), ``json`` (the record unchanged) and the
original image bytes, never re-encoded: one image under its extension (``jpg``, ``png``, ...), several
(``"image": [...]``, LLaVA-OneVision style) as ``0.jpg``, ``1.png``, ... in placeholder order; text-only
records get only ``json``. A LLaVA-Video record (``"video": "clips/a.mp4"``, under ``--images`` too, its one
``<image>`` placeholder standing for the video) gets its sampled frames as ``frames.npy`` and their timing
added to its record under ``"frames"`` (data/video_files.py decodes them with PyAV, the `video` extra;
data/frames.py: Qwen's sampling rule, 2 frames per second unless ``--video-fps`` / ``--video-frames`` say
otherwise); a video that does not decode or is truncated is skipped like a corrupt image. No record stops the conversion: one that cannot be a usable sample (the rule
of data/validity.py, which training and evaluation apply too, or an image that is missing, corrupt or
outside ``--images``) is skipped, counted by reason and listed in ``OUT/<prefix>-skipped.jsonl`` (record
index, id, reason, detail; docs/data-conversion.md); ``--strict`` stops at the first one instead. Image
paths that could leave ``--images`` (absolute, or with a ``..`` part) are refused unless
``--allow-outside-images`` is given: the JSON may come from anywhere, and its paths must not copy
arbitrary files of this machine into shards. Shard k always holds records [k*S, (k+1)*S) of the input,
so a rerun of the same command skips the shards recorded in ``OUT/<prefix>-progress.json`` and continues
where it stopped; a finished shard is written again when an image it lacked is now there. Progress and
reports are named by ``--prefix``, so train and val conversions can share ``OUT``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter

from .frames import FRAMES_MEMBER, encode_frames
from .members import IMAGE_KEYS, member_names
from .validity import InvalidSample, check_record, image_paths, video_path

MAX_REPORTED_MISSING = 20
FORMAT_KEYS = {"jpeg": "jpg", "mpo": "jpg", "png": "png", "webp": "webp", "bmp": "bmp", "gif": "gif", "tiff": "tif"}


class ConversionError(Exception):
    """Bad input; the message names the file (and record) at fault."""


@dataclass
class ShardResult:
    name: str
    start: int  # first input record index of this shard
    stop: int  # one past the last input record index
    samples: int = 0  # written samples (text-only included)
    text_only: int = 0
    multi_image: int = 0  # written samples with several images
    videos: int = 0  # written samples with a video's frames
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)  # paths that could leave the image folder (refused)
    skipped: list[dict] = field(default_factory=list)  # {"index", "id", "reason", "detail"} per skipped record


# --------------------------------------------------------------------------- input


def load_records(json_path: str | Path, max_samples: int | None = None) -> list:
    """The input records. Only a file that is no JSON list fails; each record is checked when its
    shard is written (a bad record is skipped, not fatal)."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise ConversionError(f"{json_path}: file not found")
    try:
        with open(json_path, encoding="utf-8") as f:
            records = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{json_path}: invalid JSON ({e})") from e
    if not isinstance(records, list):
        raise ConversionError(f"{json_path}: expected a JSON list of records, got {type(records).__name__}")
    return records[:max_samples] if max_samples is not None else records


def record_id(record: object) -> object:
    return record.get("id") if isinstance(record, dict) else None


def stays_inside(rel_path: str) -> bool:
    """True for a relative path without a ``..`` part, which cannot leave the image folder. (Symbolic
    links inside the folder are followed: image folders are often assembled from links.)"""
    path = Path(rel_path)
    return not path.is_absolute() and ".." not in path.parts


def read_image(images_root: Path, rel_path: str) -> tuple[str, bytes | None, str]:
    """(status, original bytes, member extension) with status "ok", "missing" or "corrupt". The
    extension is the file's own when the shard reader knows it (data.members.IMAGE_KEYS), else the
    decoded format's."""
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
    extension = path.suffix.lower().lstrip(".")
    if extension not in IMAGE_KEYS:
        extension = FORMAT_KEYS.get(image_format, "")
    return ("ok", data, extension) if extension else ("corrupt", None, "")


# --------------------------------------------------------------------------- shards


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def make_sample(record: object, index: int, images_root: Path, result: ShardResult, allow_outside: bool = False,
                strict: bool = False, video: "VideoSampling | None" = None) -> dict | None:
    """The WebDataset sample of one record, or None when it cannot be a usable sample: then it is
    listed in `result.skipped` (its image paths also in `result.missing` / `corrupt` / `outside`),
    or with `strict` the conversion stops."""
    try:
        return build_sample(record, index, images_root, result, allow_outside, video or VideoSampling())
    except InvalidSample as e:
        entry = {"index": index, "id": record_id(record), "reason": e.reason, "detail": str(e)}
        if strict:
            raise ConversionError(f"record {index} (id={entry['id']!r}) is not a usable sample: {e.reason}: {e} "
                                  "(--strict stops at the first; without it such records are skipped and reported)") from None
        result.skipped.append(entry)
        return None


@dataclass(frozen=True)
class VideoSampling:
    """How a video record's frames are sampled and stored (data/frames.py, data/extract_frames.py)."""

    fps: float | None = 2.0
    num_frames: int | None = None
    max_pixels: int | None = None  # None: data.extract_frames.MAX_PIXELS

    def read(self, path: Path):
        from .video_files import MAX_PIXELS, read_video

        return read_video(path, self.num_frames, None if self.num_frames else self.fps, self.max_pixels or MAX_PIXELS)


def build_sample(record: object, index: int, images_root: Path, result: ShardResult, allow_outside: bool,
                 video: VideoSampling = VideoSampling()) -> dict:
    """The sample, or InvalidSample: data/validity.py's rule first (no file is read for a record it
    rejects), then every image is read (all of a record's unreadable paths are reported)."""
    paths = image_paths(record) if isinstance(record, dict) else []
    clip = video_path(record) if isinstance(record, dict) else None
    check_record(record, 1 if clip is not None else len(paths))
    if clip is not None:
        return video_sample(record, index, images_root, clip, result, allow_outside, video)
    sample = {"__key__": f"{index:09d}", "json": json.dumps(record, ensure_ascii=False).encode("utf-8")}
    if not paths:
        result.text_only += 1
        return sample
    members, failed = [], []
    for path in paths:
        status, data, extension = read_image(images_root, path) if allow_outside or stays_inside(path) else ("outside", None, "")
        if status != "ok":
            getattr(result, status).append(path)
            failed.append((status, path))
        members.append((extension, data))
    if failed:
        status, path = failed[0]
        more = f" (and {len(failed) - 1} more of its {len(paths)} images)" if len(failed) > 1 else ""
        what = {"missing": "does not exist", "corrupt": "does not decode", "outside": "could leave the image folder"}[status]
        raise InvalidSample(f"{status}_image", f"image {path!r} {what}{more}")
    names = member_names([extension for extension, _ in members])  # data/members.py
    sample.update({name: data for name, (_, data) in zip(names, members)})
    result.multi_image += int(len(members) > 1)
    return sample


def video_sample(record: dict, index: int, images_root: Path, clip: str, result: ShardResult, allow_outside: bool,
                 video: VideoSampling) -> dict:
    """A video record's sample: its sampled frames and the record with their timing under "frames"."""
    path = images_root / clip
    if not (allow_outside or stays_inside(clip)):
        result.outside.append(clip)
        raise InvalidSample("outside_image", f"video {clip!r} could leave the image folder")
    if not path.is_file():
        result.missing.append(clip)
        raise InvalidSample("missing_video", f"video {clip!r} does not exist")
    try:
        frames, timing = video.read(path)
    except InvalidSample as e:
        result.corrupt.append(clip)
        raise InvalidSample(e.reason, f"video {clip!r}: {e}") from None
    result.videos += 1
    return {"__key__": f"{index:09d}", "json": json.dumps({**record, "frames": timing}, ensure_ascii=False).encode("utf-8"),
            FRAMES_MEMBER: encode_frames(frames)}


def write_shard(out_dir: Path, result: ShardResult, records: list, images_root: Path, bar: tqdm,
                allow_outside: bool = False, strict: bool = False, video: VideoSampling = VideoSampling()) -> None:
    """Writes records[result.start:result.stop] to a ``.tmp`` file, renamed only when complete.
    Fixed tar metadata (mtime 0) makes a resumed run byte-identical to a clean one."""
    final = out_dir / result.name
    tmp = final.with_name(final.name + ".tmp")
    try:
        with open(tmp, "wb") as f, TarWriter(f, encoder=False, mtime=0) as writer:
            for index in range(result.start, result.stop):
                sample = make_sample(records[index], index, images_root, result, allow_outside, strict, video)
                if sample is not None:
                    writer.write(sample)
                    result.samples += 1
                bar.update(1)
    except (ConversionError, RuntimeError):  # --strict, or video without PyAV: this shard is incomplete
        tmp.unlink(missing_ok=True)
        raise
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


def skipped_report_path(out_dir: Path, prefix: str) -> Path:
    return out_dir / f"{prefix}-skipped.jsonl"


def write_reports(out_dir: Path, fingerprint: dict, results: list[ShardResult]) -> dict:
    """``<prefix>-manifest.json``, ``<prefix>-skipped.jsonl`` (one line per skipped record: index, id,
    reason, detail) and the full lists of unreadable image paths (``<prefix>-missing_images.txt``, ...)."""
    prefix = fingerprint["prefix"]
    skipped = {kind: [p for r in results for p in getattr(r, kind)] for kind in ("missing", "corrupt", "outside")}
    for kind, paths in skipped.items():
        (out_dir / f"{prefix}-{kind}_images.txt").write_text("".join(p + "\n" for p in paths), encoding="utf-8")
    records = [entry for r in results for entry in r.skipped]
    report = skipped_report_path(out_dir, prefix)
    report.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in records), encoding="utf-8")
    manifest = {
        **fingerprint,
        "shards": [{"name": r.name, "samples": r.samples, "records": [r.start, r.stop]} for r in results],
        "written": sum(r.samples for r in results),
        "text_only": sum(r.text_only for r in results),
        "multi_image": sum(r.multi_image for r in results),
        "videos": sum(r.videos for r in results),
        "skipped_records": len(records),
        "skipped": dict(Counter(e["reason"] for e in records).most_common()),
        "skipped_report": report.name,
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
    strict: bool = False,
    video: VideoSampling = VideoSampling(),
) -> dict:
    """Runs (or resumes) the conversion and returns the summary printed by the CLI. `strict`: stop at
    the first record that cannot be a usable sample (ConversionError) instead of skipping it."""
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
    if any(isinstance(r, dict) and r.get("video") is not None for r in records):  # the frames depend on the sampling
        fingerprint["video_sampling"] = asdict(video)
    done = completed_shards(out_dir, fingerprint)
    resumed = len(done)
    retry = [k for k, r in enumerate(done) if can_read_now(r, images_root, allow_outside_images)]
    starts = range(0, len(records), samples_per_shard)
    initial = (done[-1].stop if done else 0) - sum(done[k].stop - done[k].start for k in retry)
    with tqdm(total=len(records), initial=initial, unit="rec",
              desc=f"{prefix} shards", disable=not progress) as bar:
        for k in [*retry, *range(resumed, len(starts))]:
            result = ShardResult(shard_name(prefix, k), starts[k], min(starts[k] + samples_per_shard, len(records)))
            write_shard(out_dir, result, records, images_root, bar, allow_outside_images, strict, video)
            done[k:k + 1] = [result]  # replaces a retried shard, appends a new one
            save_progress(out_dir, fingerprint, done)
    if not done:
        save_progress(out_dir, fingerprint, done)
    manifest = write_reports(out_dir, fingerprint, done)
    return {"shards": len(done), "resumed_shards": resumed - len(retry), "retried_shards": len(retry),
            "records": len(records), "written": manifest["written"], "text_only": manifest["text_only"],
            "multi_image": manifest["multi_image"], "videos": manifest["videos"], "skipped_records": manifest["skipped_records"],
            "skipped": manifest["skipped"], "missing": manifest["missing"], "corrupt": manifest["corrupt"],
            "outside": manifest["outside"], "seconds": round(time.monotonic() - started, 2),
            "first_missing": manifest["first_missing"], "first_outside": manifest["first_outside"],
            "manifest": str(out_dir / f"{prefix}-manifest.json"), "skipped_report": str(skipped_report_path(out_dir, prefix))}


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
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first record that cannot be a usable sample (default: skip it, count it by "
                             "reason and list it in OUT/{prefix}-skipped.jsonl)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--video-fps", type=float, default=None, help="video records: frames per second of video to sample (default 2)")
    how.add_argument("--video-frames", type=int, default=None, help="video records: frames per video, spread over it")
    parser.add_argument("--video-max-pixels", type=int, default=None, help="video records: largest stored frame (pixels)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    video = VideoSampling(None if args.video_frames else (args.video_fps or 2.0), args.video_frames, args.video_max_pixels)
    try:
        summary = convert(args.json, args.images, args.out, args.samples_per_shard, args.prefix, args.max_samples,
                          progress=not args.no_progress, allow_outside_images=args.allow_outside_images, strict=args.strict,
                          video=video)
    except (ConversionError, RuntimeError) as e:  # RuntimeError: video records without PyAV (data/video_files.py)
        sys.exit(f"convert_llava: error: {e}")
    json.dump(summary, sys.stdout, indent=2)
    print()
    if summary["skipped_records"]:
        reasons = ", ".join(f"{r} {n}" for r, n in summary["skipped"].items())
        print(f"convert_llava: skipped {summary['skipped_records']} of {summary['records']} records ({reasons}); "
              f"each is listed in {summary['skipped_report']} (docs/data-conversion.md)", file=sys.stderr)


if __name__ == "__main__":
    main()
