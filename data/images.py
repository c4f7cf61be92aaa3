"""Image decoding (PIL). Preprocessing is the model family's (models/families/: LLaVA-1.5 pads to a
square, LLaVA-NeXT tiles), handed to the data module as `ImageSpec.processor`.
"""

from __future__ import annotations

import io

from PIL import Image


def decode(data: bytes) -> Image.Image:
    """Decode image bytes to RGB; raises on corrupt data (the pipeline counts and skips such samples)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")
