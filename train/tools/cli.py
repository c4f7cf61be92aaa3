"""Config composition for the tools (`python -m train flops`, `... bench`, ...): the same `conf/`
tree and override syntax as the training job, without run directories or logging set-up, so the
only thing on stdout is the tool's JSON result."""

from __future__ import annotations

import sys

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from ..builders import CONF_DIR, register_resolvers


def compose_cli(config_name: str, argv: list[str] | None = None) -> DictConfig:
    overrides = list(sys.argv[1:] if argv is None else argv)
    register_resolvers()
    if any(a in ("-h", "--help") for a in overrides):
        print(f"usage: python -m train {config_name} [hydra overrides], e.g. model=tiny arch=vica; defaults:\n")
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            print(OmegaConf.to_yaml(compose(config_name=config_name)))
        raise SystemExit(0)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)
