"""Image decoding and LLaVA-1.5 preprocessing (pad to square with the mean colour, resize, normalise).

PIL + numpy only: torchvision is not a dependency.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def decode(data: bytes) -> Image.Image:
    """Decode image bytes to RGB; raises on corrupt data (the pipeline counts and skips such samples)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new("RGB", (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def preprocess(img: Image.Image, size: int, mean, std) -> torch.Tensor:
    """`[3, size, size]` float tensor, normalised like the vision tower expects."""
    img = expand_to_square(img, tuple(int(255 * m) for m in mean))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())
