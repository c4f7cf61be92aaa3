"""`python -m train convert_checkpoint convert.src=<dir> convert.out=<dir> [convert.vision_tower=<clip dir>]`

Writes a checkpoint directory in the other layout, tensors unchanged (same values, same dtype):

* llava-hf (`LlavaForConditionalGeneration`, or one of our llava exports) -> the original LLaVA layout
  of haotian-liu/LLaVA (flat Llama config.json, `model.*` / `lm_head.*` / `model.mm_projector.*`
  weights), its vision tower as a CLIP directory `out/vision_tower` that `mm_vision_tower` names;
* the original layout (LLaVA-1.5's release, models trained with the LLaVA codebase) -> llava-hf, which
  transformers loads; the tower comes from `convert.vision_tower` or the directory `mm_vision_tower`
  names. MobileVLM V2 (`ldpnetv2`) has no transformers class: its only layout is the original one.

The tokenizer and the other files of `src` (generation_config.json, chat template, ...) are copied.
Prints one JSON line: the source, the output and the layout written. models/original_layout.py has the
name and config mapping.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from models import MLLMConfig
from models import original_layout
from models.checkpoint import read_config as read_raw_config
from models.checkpoint import write_checkpoint
from models.config import ConfigError

from .cli import compose_cli

WEIGHT_SUFFIXES = (".safetensors", ".bin")
NOT_COPIED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", original_layout.TOWER_DIR}


def convert_checkpoint(src, out, vision_tower=None) -> dict:
    """Convert `src` into `out` (see the module docstring); returns what the CLI prints."""
    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve():
        raise ConfigError(f"convert.out must differ from convert.src ({src})")
    to_original = not original_layout.is_original(read_raw_config(src, "convert.src"))
    hf = original_layout.read_config(src, vision_tower, "convert.src")
    config = MLLMConfig.from_hf(hf)
    family = config.model_family
    if not to_original and family.original_layout:
        raise ConfigError(f"{src} is a {family.name} checkpoint (mm_projector_type {config.projector!r}): no transformers class "
                          "reads it, so the original layout is its only one")
    state = {family.to_internal_name(k): v for k, v in original_layout.read_state_dict(src, vision_tower).items()}
    state = {k: v for k, v in state.items() if not family.dropped_on_load(k)}
    current = config.to_hf_dict()
    current["architectures"] = [family.hf_architecture]
    current["dtype"] = str(next(v for v in state.values() if v.is_floating_point()).dtype).removeprefix("torch.")
    if "plan" in hf.get("efficient_mllm", {}):
        current["efficient_mllm"]["plan"] = hf["efficient_mllm"]["plan"]
    if to_original:
        if config.text_family != "llama":
            raise ConfigError(f"the original LLaVA layout is a Llama checkpoint; {src} has a {config.text_family} LLM")
        original_layout.write_checkpoint(out, original_layout.original_state(state, current), current)
    else:
        write_checkpoint(out, {family.to_hub_name(k): v for k, v in state.items()}, current)
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in NOT_COPIED and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(f, out / f.name)
            copied.append(f.name)
    return {"src": str(src), "out": str(out), "layout": "original" if to_original else "llava-hf", "family": family.name,
            "copied": copied}


def main() -> None:
    cfg = compose_cli("convert_checkpoint").convert
    print(json.dumps(convert_checkpoint(cfg.src, cfg.out, cfg.vision_tower)))


if __name__ == "__main__":
    main()
