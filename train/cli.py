"""Config composition for the small CLIs (`train.flops`, `train.bench`, ...): the same `conf/`
tree and override syntax as `python -m train`, without run directories or logging setup, so the
only thing on stdout is the JSON result."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def expand_plan_files(argv: list[str]) -> list[str]:
    """`arch=<path to a .yaml plan>` -> `arch=file arch.path=<absolute path>`."""
    out = []
    for a in argv:
        key, _, value = a.partition("=")
        if key == "arch" and value.endswith((".yaml", ".yml")) and ("/" in value or Path(value).is_file()):
            out += ["arch=file", f"arch.path={Path(value).expanduser().resolve()}"]
        else:
            out.append(a)
    return out


def compose_cli(config_name: str, argv: list[str] | None = None) -> DictConfig:
    overrides = expand_plan_files(list(sys.argv[1:] if argv is None else argv))
    if any(a in ("-h", "--help") for a in overrides):
        print(f"usage: python -m train.{config_name} [hydra overrides], e.g. model=tiny arch=vica; defaults:\n")
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            print(OmegaConf.to_yaml(compose(config_name=config_name)))
        raise SystemExit(0)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)
