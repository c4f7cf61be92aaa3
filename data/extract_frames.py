"""Sample frames of real video files into WebDataset shards, once, offline (PyAV: the `video` extra).

    python -m data.extract_frames --videos VIDEO_DIR --out OUT_DIR [--fps 2 | --num-frames N] \
        [--max-pixels 602112] [--samples-per-shard 100] [--prefix frames]

Every video file under VIDEO_DIR (by extension, sorted) becomes one sample: ``frames.npy`` (uint8
[F, H, W, 3], the sampled frames, scaled down to at most ``--max-pixels`` each) and ``json``
(``{"video": its path under VIDEO_DIR, "frames": {fps, total_frames, frame_indices, sampled_fps}}``).
Frames are sampled by Qwen's rule (data/frames.py: ``--fps`` per second of video, 2 by default, or
``--num-frames``), and the sampled fps is always stored: it is what places the frames in time.
A file that does not open, has no video stream, is truncated (fewer frames decode than its header
promises) or is too short is skipped, counted by reason in ``OUT/<prefix>-manifest.json`` and listed
in ``OUT/<prefix>-skipped.jsonl``. ``python -m data.convert_llava`` reads LLaVA-Video records
(``"video": "clips/a.mp4"``) through the same `read_video` (data/video_files.py). Training and evaluation read the frames from
shards and never decode video.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from webdataset import TarWriter

from .frames import FRAMES_MEMBER, encode_frames
from .validity import InvalidSample
from .video_files import MAX_PIXELS, read_video, require_av

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".ts")


def video_files(root: Path) -> list[Path]:
    """The video files under `root`, sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)


def extract(videos: str | Path, out_dir: str | Path, num_frames: int | None = None, fps: float | None = 2.0,
            max_pixels: int | None = MAX_PIXELS, samples_per_shard: int = 100, prefix: str = "frames") -> dict:
    """Writes the shards and reports; returns the manifest."""
    root, out_dir = Path(videos), Path(out_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: video folder not found")
    require_av()
    out_dir.mkdir(parents=True, exist_ok=True)
    files = video_files(root)
    skipped, shards, written = [], [], 0
    writer = None
    for index, path in enumerate(files):
        name = path.relative_to(root).as_posix()
        try:
            frames, meta = read_video(path, num_frames, fps, max_pixels)
        except InvalidSample as e:
            skipped.append({"index": index, "video": name, "reason": e.reason, "detail": str(e)})
            continue
        if writer is None or written % samples_per_shard == 0:
            if writer is not None:
                writer.close()
            shards.append(f"{prefix}-{len(shards):06d}.tar")
            writer = TarWriter(str(out_dir / shards[-1]), encoder=False, mtime=0)
        record = {"video": name, "frames": meta}
        writer.write({"__key__": f"{index:09d}", "json": json.dumps(record).encode(), FRAMES_MEMBER: encode_frames(frames)})
        written += 1
    if writer is not None:
        writer.close()
    report = out_dir / f"{prefix}-skipped.jsonl"
    report.write_text("".join(json.dumps(e) + "\n" for e in skipped))
    manifest = {"videos": len(files), "written": written, "shards": shards, "skipped_videos": len(skipped),
                "skipped": dict(Counter(e["reason"] for e in skipped)), "skipped_report": report.name,
                "sampling": {"num_frames": num_frames} if num_frames else {"fps": fps}, "max_pixels": max_pixels}
    (out_dir / f"{prefix}-manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="video files -> WebDataset shards of sampled frames (Qwen's sampling rule)")
    parser.add_argument("--videos", required=True, help="folder of video files (searched recursively by extension)")
    parser.add_argument("--out", required=True, help="output folder for shards and reports")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--fps", type=float, default=None, help="frames per second of video to sample (default 2)")
    how.add_argument("--num-frames", type=int, default=None, help="frames per video, spread over it")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="largest stored frame (pixels; aspect kept)")
    parser.add_argument("--samples-per-shard", type=int, default=100)
    parser.add_argument("--prefix", default="frames")
    args = parser.parse_args(argv)
    fps = None if args.num_frames else (args.fps or 2.0)
    try:
        manifest = extract(args.videos, args.out, args.num_frames, fps, args.max_pixels, args.samples_per_shard, args.prefix)
    except (FileNotFoundError, RuntimeError) as e:
        sys.exit(f"extract_frames: error: {e}")
    json.dump(manifest, sys.stdout, indent=2)
    print()
    if manifest["skipped_videos"]:
        print(f"extract_frames: skipped {manifest['skipped_videos']} of {manifest['videos']} videos ({manifest['skipped']}); each "
              f"is listed in {Path(args.out) / manifest['skipped_report']}", file=sys.stderr)


if __name__ == "__main__":
    main()
