"""`python -m train [hydra overrides]`: see conf/train.yaml."""

import sys

import hydra
from omegaconf import DictConfig

from .cli import expand_plan_files
from .run import run


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    summary = run(cfg)
    return summary["metrics"].get("val/acc")  # what a Hydra sweeper optimises


if __name__ == "__main__":
    sys.argv = sys.argv[:1] + expand_plan_files(sys.argv[1:])
    main()
