"""Video frames in shards: which frames are sampled, how they and their timing are stored, how a
reader gets them back. No decoder here: decoding happens once, offline (data/extract_frames.py).

Sampling is Qwen's reference rule (qwen-vl-utils `smart_nframes` and `linspace(0, total - 1, n).round()`):
a fixed count rounded to a multiple of 2, or `fps` frames per second of the source, clamped to [4, 768]
and to the video, floored to a multiple of 2 (one temporal step is 2 frames). transformers' video
processor picks other frames (`arange(0, total, total / n)`), which matters for published numbers.

A sample holds its frames as one `frames.npy` member (uint8 [F, H, W, 3], lossless) and their timing in
its JSON record under "frames": the source's `fps` and `total_frames`, the `frame_indices` sampled, and
`sampled_fps` = F / total * fps, which places the frames in time (a temporal step spans 2 / sampled_fps
seconds). The sampled fps is always stored: transformers' processor falls back to 24 fps without it.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch

from .validity import InvalidSample

FRAMES_MEMBER = "frames.npy"
TEMPORAL_FACTOR = 2  # frames per temporal step (Qwen's temporal_patch_size)
MIN_FRAMES, MAX_FRAMES = 4, 768  # the reference's bounds when sampling by fps


def frame_count(total_frames: int, source_fps: float, num_frames: int | None = None, fps: float | None = None,
                min_frames: int = MIN_FRAMES, max_frames: int = MAX_FRAMES) -> int:
    """How many frames to sample (`num_frames`, or `fps` per second of video), Qwen's rule."""
    if (num_frames is None) == (fps is None):
        raise ValueError("sample frames by a count (num_frames) or a rate (fps), exactly one")
    if num_frames is not None:
        n = round(num_frames / TEMPORAL_FACTOR) * TEMPORAL_FACTOR
    else:
        low = math.ceil(min_frames / TEMPORAL_FACTOR) * TEMPORAL_FACTOR
        high = math.floor(min(max_frames, total_frames) / TEMPORAL_FACTOR) * TEMPORAL_FACTOR
        n = min(max(total_frames / source_fps * fps, low), high, total_frames)
        n = math.floor(n / TEMPORAL_FACTOR) * TEMPORAL_FACTOR
    if not TEMPORAL_FACTOR <= n <= total_frames:
        raise ValueError(f"a video of {total_frames} frames cannot give {n} sampled frames (at least {TEMPORAL_FACTOR}, at most "
                         "all of them)")
    return n


def frame_indices(total_frames: int, n: int) -> list[int]:
    """`n` frame indices spread over the video, first and last included (linspace, rounded half to even)."""
    return torch.linspace(0, total_frames - 1, n).round().long().tolist()


def timing(total_frames: int, source_fps: float, indices: list[int]) -> dict:
    """The "frames" metadata of a record whose frames are `indices` of a `total_frames`-frame video."""
    return {"fps": float(source_fps), "total_frames": int(total_frames), "frame_indices": [int(i) for i in indices],
            "sampled_fps": len(indices) / total_frames * float(source_fps)}


def encode_frames(frames: np.ndarray) -> bytes:
    """The `frames.npy` member of uint8 frames [F, H, W, 3]."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    out = io.BytesIO()
    np.save(out, frames, allow_pickle=False)
    return out.getvalue()


def read_frames(raw: dict, record: dict) -> tuple[np.ndarray, float, list[float] | None]:
    """A shard sample's frames [F, H, W, 3], their sampled fps and each frame's time in the source video
    (frame index / source fps; None when the record does not say); InvalidSample (`bad_video_frames`)
    when the frames or their fps are missing or unreadable."""
    try:
        frames = np.load(io.BytesIO(raw[FRAMES_MEMBER]), allow_pickle=False)
    except Exception as e:  # a damaged .npy raises ValueError, EOFError, ...
        raise InvalidSample("bad_video_frames", f"{FRAMES_MEMBER} does not load ({type(e).__name__}: {e})") from None
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise InvalidSample("bad_video_frames", f"{FRAMES_MEMBER} holds {frames.dtype} {list(frames.shape)}, not uint8 [F, H, W, 3]")
    fps = (record.get("frames") or {}).get("sampled_fps") if isinstance(record.get("frames"), dict) else None
    if not isinstance(fps, (int, float)) or not fps > 0:
        raise InvalidSample("bad_video_frames", f"the record's frames.sampled_fps is {fps!r}: the frames' timing is unknown "
                            "(data/extract_frames.py stores it)")
    return frames, float(fps), frame_times(record["frames"], len(frames))


def frame_times(timing: dict, n: int) -> list[float] | None:
    """Each of `n` sampled frames' time in the source video in seconds, from a record's "frames" timing."""
    indices, fps = timing.get("frame_indices"), timing.get("fps")
    if not isinstance(indices, list) or len(indices) != n or not isinstance(fps, (int, float)) or not fps > 0:
        return None
    return [i / fps for i in indices]
