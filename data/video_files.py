"""Video files through PyAV (the `video` extra): reading sampled frames (the offline extractor,
data/extract_frames.py, the converter, and lmms-eval's video documents) and writing frames as a video
file (the synthetic video task's .mp4 files for lmms-eval). Nothing else in the project decodes video.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from .frames import frame_count, frame_indices, timing
from .validity import InvalidSample

MAX_PIXELS = 768 * 28 * 28  # Qwen's largest video frame: nothing a Qwen model reads is lost


def require_av():
    """PyAV, or a clear error naming the extra that installs it."""
    try:
        import av
    except ImportError:
        raise RuntimeError("decoding video needs PyAV: pip install -e '.[video]' (the `video` extra)") from None
    return av


def scaled(frame: np.ndarray, max_pixels: int | None) -> np.ndarray:
    """`frame` shrunk (bicubic, aspect kept) to at most `max_pixels` pixels."""
    h, w = frame.shape[:2]
    if max_pixels is None or h * w <= max_pixels:
        return frame
    scale = (max_pixels / (h * w)) ** 0.5
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    return np.asarray(Image.fromarray(frame).resize(size, Image.BICUBIC))


def read_video(path: str | Path, num_frames: int | None = None, fps: float | None = 2.0,
               max_pixels: int | None = MAX_PIXELS) -> tuple[np.ndarray, dict]:
    """The sampled frames [F, H, W, 3] of a video file and their timing (data/frames.py); InvalidSample
    (`corrupt_video`) for a file that cannot give them."""
    av = require_av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InvalidSample("corrupt_video", "the file has no video stream")
            stream = container.streams.video[0]
            source_fps = float(stream.average_rate or stream.guessed_rate or 0)
            total = stream.frames or sum(1 for _ in container.decode(stream))  # some containers do not say
            if not source_fps > 0 or total < 1:
                raise InvalidSample("corrupt_video", f"the video stream gives {total} frames at {source_fps} fps")
            if not stream.frames:
                container.seek(0)
            indices = frame_indices(total, frame_count(total, source_fps, num_frames, None if num_frames else fps))
            wanted, frames = Counter(indices), []
            for k, frame in enumerate(container.decode(stream)):
                if k in wanted:
                    frames += [scaled(frame.to_ndarray(format="rgb24"), max_pixels)] * wanted[k]
                if k >= indices[-1]:
                    break
    except InvalidSample:
        raise
    except ValueError as e:  # frame_count: too short for the sampling
        raise InvalidSample("corrupt_video", str(e)) from None
    except Exception as e:  # PyAV raises FFmpeg's many errors for broken files
        raise InvalidSample("corrupt_video", f"does not decode ({type(e).__name__}: {e})") from None
    if len(frames) < len(indices):
        raise InvalidSample("corrupt_video", f"truncated: {len(frames)} of the {len(indices)} sampled frames decode "
                            f"(its header promises {total} frames)")
    return np.stack(frames), timing(total, source_fps, indices)


PIXEL_FORMATS = {"libx264": "yuv420p", "ffv1": "bgr0"}  # what players read; ffv1 (.mkv): lossless RGB


def write_video(path: str | Path, frames: np.ndarray, fps: float, codec: str = "libx264") -> None:
    """Frames (uint8 [F, H, W, 3], even sides for H.264) as a video file at `fps`: libx264 at crf 0 (an
    .mp4 every player reads; chroma subsampled to 4:2:0, so colours come back within a few levels), or
    ffv1 (an .mkv whose frames come back exactly)."""
    av = require_av()
    from fractions import Fraction

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = PIXEL_FORMATS[codec]
        stream.options = {"crf": "0"} if codec == "libx264" else {}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
