"""Evaluation image preprocessing: what the checkpoint's image processor does, in PIL + numpy.

A llava-hf directory ships `preprocessor_config.json` (a CLIPImageProcessor: resize the shortest
edge, center crop, CLIP mean/std). LLaVA-1.5 itself was trained on images padded to a square with
the mean colour first (`image_aspect_ratio: pad`, arXiv 2310.03744), which that config does not
record: transformers' LlavaImageProcessor has `do_pad` for it, off by default. `pad_to_square`
decides; `None` reads `do_pad` from the config and pads when the key is absent, because every
checkpoint this bridge loads (LLaVA-1.5 and our exports, see models/families/llava.py) was trained padded.
torchvision is not needed; the result equals transformers' PIL-backend LlavaImageProcessor.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.families.llava import expand_to_square
from models import MLLMConfig

PREPROCESSOR_FILE = "preprocessor_config.json"
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the CLIP / LLaVA resample


@dataclass(frozen=True)
class ImageProcessing:
    shortest_edge: int  # resize so the shorter side has this length (keeps the aspect ratio)
    crop: int  # then center-crop a crop x crop square (the vision tower's image_size)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pad_to_square: bool  # pad with the mean colour to a square before resizing (LLaVA-1.5)
    resample: int = BICUBIC

    @classmethod
    def for_model(cls, config: MLLMConfig) -> "ImageProcessing":
        """What training did (the llava family's `PadToSquare`): pad, resize to the tower's size, normalise."""
        size = config.hf_vision_config().image_size
        return cls(size, size, tuple(config.image_mean), tuple(config.image_std), pad_to_square=True)

    @classmethod
    def from_dict(cls, d: dict, pad_to_square: bool | None = None, source: str = PREPROCESSOR_FILE) -> "ImageProcessing":
        """From the fields of a CLIPImageProcessor / LlavaImageProcessor `preprocessor_config.json`."""
        if d.get("do_resize", True) is False or d.get("do_normalize", True) is False or d.get("do_rescale", True) is False:
            raise ValueError(f"{source}: do_resize/do_rescale/do_normalize false is not supported (LLaVA processors set all three)")
        size, crop = d.get("size", 224), d.get("crop_size", d.get("size", 224))
        if isinstance(size, dict):
            if "shortest_edge" not in size:
                raise ValueError(f"{source}: size {size} has no shortest_edge (expected the CLIP processor's form)")
            size = size["shortest_edge"]
        if isinstance(crop, dict):
            if crop.get("height") != crop.get("width"):
                raise ValueError(f"{source}: crop_size {crop} is not square; LLaVA vision towers take square images")
            crop = crop["height"]
        if d.get("do_center_crop", True) is False:
            crop = size  # no crop: a square (padded) image resized to `size` is already size x size
        pad = d.get("do_pad", True) if pad_to_square is None else pad_to_square
        rescale = d.get("rescale_factor", 1 / 255)
        if abs(rescale - 1 / 255) > 1e-9:
            raise ValueError(f"{source}: rescale_factor {rescale} is not 1/255")
        return cls(int(size), int(crop), tuple(d["image_mean"]), tuple(d["image_std"]), bool(pad), int(d.get("resample", BICUBIC)))

    @classmethod
    def from_pretrained(cls, path: str | Path, config: MLLMConfig, pad_to_square: bool | None = None) -> "ImageProcessing":
        """The directory's preprocessor_config.json, or (none there) what training did for `config`."""
        file = Path(path) / PREPROCESSOR_FILE
        if not file.is_file():
            out = cls.for_model(config)
            return out if pad_to_square is None else cls(**{**asdict(out), "pad_to_square": pad_to_square})
        out = cls.from_dict(json.loads(file.read_text()), pad_to_square, str(file))
        size = config.hf_vision_config().image_size
        if out.crop != size:
            raise ValueError(f"{file} crops {out.crop} px but the vision tower takes {size} px images; the file belongs to another model")
        return out

    def to_dict(self) -> dict:
        """`preprocessor_config.json` fields that transformers' LlavaImageProcessor reads the same way."""
        return {
            "image_processor_type": "LlavaImageProcessor",
            "processor_class": "LlavaProcessor",
            "do_convert_rgb": True,
            "do_pad": self.pad_to_square,
            "do_resize": True,
            "size": {"shortest_edge": self.shortest_edge},
            "resample": self.resample,
            "do_center_crop": True,
            "crop_size": {"height": self.crop, "width": self.crop},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
        }

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """`[3, crop, crop]` float32 pixel values."""
        image = image.convert("RGB")
        if self.pad_to_square:
            image = expand_to_square(image, tuple(int(255 * m) for m in self.mean))
        w, h = image.size
        short, long = min(w, h), max(w, h)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)  # transformers' rounding
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), resample=self.resample)
        if self.crop > min(new_w, new_h):
            raise ValueError(f"crop {self.crop} is larger than the resized image {new_w}x{new_h}; shortest_edge must be >= crop")
        top, left = (new_h - self.crop) // 2, (new_w - self.crop) // 2
        x = np.asarray(image, dtype=np.float32)[top : top + self.crop, left : left + self.crop] / 255.0
        x = (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(x.transpose(2, 0, 1).copy())

