"""`arch=` for evaluation: a preset name (conf/arch/<name>.yaml), a plan YAML file, or several
joined by `+` or listed as `[a,b]` (the two forms `python -m train arch=...` accepts too; lmms-eval
keeps a bracketed list together when it splits model_args on commas), resolved like the training job."""

from __future__ import annotations

from pathlib import Path

import yaml

from models import MLLMConfig
from models.config import ConfigError
from models.methods import load_arch, resolve_arch
from models.plan import Plan

ARCH_DIR = Path(__file__).resolve().parents[2] / "conf" / "arch"


def presets() -> list[str]:
    return sorted(p.stem for p in ARCH_DIR.glob("*.yaml") if p.stem != "file")


def load_arch_spec(arch: str) -> dict:
    """The arch config of `arch`: parts are merged in order, as Hydra composes `arch=[a,b]`."""
    merged: dict = {}
    listed = arch.strip()
    if listed.startswith("[") and listed.endswith("]"):
        listed = listed[1:-1].replace(",", "+")
    parts = [p.strip() for p in listed.split("+") if p.strip()]
    if not parts:
        raise ConfigError("arch is empty; give a preset name (e.g. fastv), a plan .yaml file, or names joined by '+' ([a,b] also works)")
    for part in parts:
        if part.endswith((".yaml", ".yml")) or "/" in part:
            spec = load_arch({"path": str(Path(part).expanduser().resolve())})
        else:
            file = ARCH_DIR / f"{part}.yaml"
            if part == "file" or not file.is_file():
                raise ConfigError(f"arch {part!r} is neither a preset ({', '.join(presets())}) nor a .yaml plan file")
            spec = yaml.safe_load(file.read_text()) or {}
        for key, value in spec.items():
            if key == "methods":
                merged.setdefault("methods", {}).update(value or {})
            else:
                merged[key] = value
    if len(parts) > 1:
        merged.pop("name", None)  # the combination is named after its methods
    return merged


def plan_for_checkpoint(arch: str, config: MLLMConfig) -> Plan:
    """The plan of `arch` for this model's depth and heads (models.methods.resolve_arch)."""
    text = config.hf_text_config()
    return resolve_arch(load_arch_spec(arch), text.num_hidden_layers, text.num_attention_heads, config.family,
                        getattr(text, "layer_types", None))
