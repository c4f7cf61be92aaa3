"""Set up a virtual environment for efficient-mllm and run the main job: `python3 train/bootstrap.py`.

Standard library only, so it runs before anything is installed. The torch build is chosen so that
nothing breaks and nothing huge is pulled by accident:
  * a torch the calling Python can already import (e.g. the user's CUDA build) is reused: the venv
    is created with `--system-site-packages` and torch is not reinstalled;
  * otherwise, on a machine with an NVIDIA GPU (`nvidia-smi` works), pip's default torch (CUDA);
  * otherwise the CPU build `torch==2.13.0` (set TORCH_INDEX_URL, e.g.
    https://download.pytorch.org/whl/cpu, where the default index would serve a CUDA wheel).
Then the project is installed editable with its test and video extras (PyAV, for the offline frame
extractor and its tests), and `python -m train ARGS` runs.
`--eval` also installs lmms-eval (train/lmms/) without the requirements its package declares: they
would pull torchvision, opencv, yt-dlp, ... and pin wandb==0.25.0; the harness needs only EVAL_DEPS.

    python3 train/bootstrap.py [--venv .venv] [--no-run] [--eval] [hydra overrides for python -m train ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_TORCH = "torch==2.13.0"
# What `python -m lmms_eval` and its local json tasks import, installed with their dependencies
# (nothing already installed changes). Plain typepy: typepy[datetime] would downgrade python-dateutil.
EVAL_DEPS = [
    "datasets==5.2.0", "evaluate==0.4.6", "loguru==0.7.3", "sacrebleu==2.6.0", "tenacity==9.2.1", "pytz==2026.6",
    "typepy==1.3.5", "mbstrdecoder==1.1.5", "pathvalidate==3.3.1", "tcolorpy==0.1.7", "accelerate>=0.29.1",
]
# Installed without dependencies, after EVAL_DEPS: lmms-eval itself, and its results-table writer
# whose requirement typepy[datetime] caps python-dateutil<3.
EVAL_NO_DEPS = ["lmms-eval==0.7.3", "pytablewriter==1.2.1", "DataProperty==1.1.1", "tabledata==1.3.5"]


def has_torch(python: str) -> bool:
    return subprocess.run([python, "-c", "import torch"], capture_output=True).returncode == 0


def has_nvidia_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    return bool(smi) and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


def pip(python: Path, *args: str) -> None:
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", default=str(ROOT / ".venv"), help="virtual environment to create or reuse")
    parser.add_argument("--no-run", action="store_true", help="only set up, do not run the main job")
    parser.add_argument("--eval", action="store_true", help="also install lmms-eval (python -m lmms_eval --model efficient_mllm)")
    args, overrides = parser.parse_known_args()

    env_dir = Path(args.venv)
    python = env_dir / "bin" / "python"
    reuse_torch = has_torch(sys.executable)
    if not python.exists():
        print(f"creating {env_dir} ({'reusing the installed torch' if reuse_torch else 'fresh'})", flush=True)
        venv.EnvBuilder(with_pip=True, system_site_packages=reuse_torch).create(env_dir)
    if not has_torch(str(python)):
        if has_nvidia_gpu():
            pip(python, "torch")
        else:
            index = os.environ.get("TORCH_INDEX_URL")
            pip(python, CPU_TORCH, *(["--index-url", index] if index else []))
    pip(python, "-e", f"{ROOT}[test,video]")
    if args.eval:
        pip(python, *EVAL_DEPS)
        pip(python, "--no-deps", *EVAL_NO_DEPS)
    if args.no_run:
        print(f"ready: {python} -m train", flush=True)
        return
    os.chdir(ROOT)
    os.execv(str(python), [str(python), "-m", "train", *overrides])


if __name__ == "__main__":
    main()
