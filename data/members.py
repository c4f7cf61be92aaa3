"""How a sample's images are named inside a shard, for the writer (data/convert_llava.py) and the
reader (data/pipeline.py) alike.

One image is the member named by its extension (`000000001.jpg`), as every shard written before
multi-image samples holds, so those shards read unchanged. Several are numbered in placeholder order:
`000000001.0.jpg`, `000000001.1.png`, ... (WebDataset keys `0.jpg`, `1.png`).
"""

from __future__ import annotations

import re

from .validity import InvalidSample

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
INDEXED = re.compile(r"^(\d+)\.(" + "|".join(IMAGE_KEYS) + r")$")


def member_names(extensions: list[str]) -> list[str]:
    """The member keys of a sample whose images have these extensions, in order."""
    if len(extensions) == 1:
        return list(extensions)
    return [f"{k}.{ext}" for k, ext in enumerate(extensions)]


def image_members(raw: dict) -> list[bytes]:
    """A raw sample's image bytes in placeholder order; InvalidSample (`bad_image_members`) when its
    members follow neither naming."""
    indexed = {int(m.group(1)): value for name, value in raw.items() if (m := INDEXED.match(name))}
    single = [k for k in IMAGE_KEYS if k in raw]
    if not indexed:
        if len(single) > 1:
            raise InvalidSample("bad_image_members", f"several unnumbered image members {single}; several images are 0.<ext>, 1.<ext>, ...")
        return [raw[k] for k in single]
    if single or sorted(indexed) != list(range(len(indexed))):
        names = sorted(single) + [f"{i}.<ext>" for i in sorted(indexed)]
        raise InvalidSample("bad_image_members", f"image members {names} are neither one <ext> nor 0.<ext> .. n-1.<ext>")
    return [indexed[i] for i in range(len(indexed))]
