"""`python -m train [hydra overrides]`: see conf/train.yaml."""

import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig

from .cli import expand_plan_files
from .run import run


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = run(cfg)
    except Exception:  # the run directory keeps why (a sweep job's error is otherwise only in a pickle)
        Path(cfg.paths.output_dir, "error.txt").write_text(traceback.format_exc())
        raise
    return summary["metrics"].get("val/acc")  # what a Hydra sweeper optimises


if __name__ == "__main__":
    sys.argv = sys.argv[:1] + expand_plan_files(sys.argv[1:])
    main()
