#!/bin/bash
# GPU benchmark in one go: every plan against dense and against transformers' LlavaForConditionalGeneration
# (SDPA) on LLaVA-1.5-7B shapes with random weights, bf16, batch 1 and 16 (train/tools/bench.py). About 8 minutes
# on one H100/H200-class GPU, model set-up included.
#
#   bash slurm/gpu_bench.sh [OUT_DIR]            # default OUT_DIR: $OUT, else outputs/gpu_bench
#   sbatch --gpus=1 --time=00:20:00 slurm/gpu_bench.sh /path/to/results
#   bash slurm/gpu_bench.sh --tiny [OUT_DIR]     # the same runs on the tiny model, on CPU (checks the script)
#
# Installs nothing when the Python in use already imports the project's dependencies (a CUDA torch among
# them: the repository is put on PYTHONPATH); otherwise train/bootstrap.py makes .venv (it keeps a torch
# the Python already has, else pip's default CUDA build on a machine with an NVIDIA GPU). Each batch size
# writes bench-*.json (rows per plan: prefill / training step / decode ms, peak allocated MiB, FLOPs and
# time ratios, the HF row, dense/HF ratios) into OUT_DIR, after every plan, plus nvidia-smi.txt and log.txt.
#SBATCH --job-name=emllm-gpu-bench
#SBATCH --gpus=1
#SBATCH --time=00:20:00
#SBATCH --output=%x-%j.out
set -euo pipefail

TINY=0
if [ "${1:-}" = "--tiny" ]; then TINY=1; shift; fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "$SLURM_SUBMIT_DIR/train/tools/bench.py" ] && ROOT="$SLURM_SUBMIT_DIR"
DEST="$(mkdir -p "${1:-${OUT:-$ROOT/outputs/gpu_bench}}" && cd "${1:-${OUT:-$ROOT/outputs/gpu_bench}}" && pwd)"
cd "$ROOT"

PYTHON="${EMLLM_PYTHON:-python3}"
if ! PYTHONPATH="$ROOT" "$PYTHON" -c "import torch, transformers, hydra, tokenizers, safetensors; import train.tools.bench" 2>/dev/null; then
  python3 train/bootstrap.py --no-run
  PYTHON="$ROOT/.venv/bin/python"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export HF_HUB_OFFLINE=1 EMLLM_ROOT="$ROOT"

ARCHS=vica,shortv,vtw,fastv,pdrop
if [ "$TINY" = 1 ]; then
  BATCHES="1 2"
  ARGS=(model=tiny bench.device=cpu bench.dtype=bf16 bench.n_visual=16 bench.n_text=8 bench.new_tokens=2 bench.warmup=0 bench.repeats=1)
else
  "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch ' + torch.__version__" 
  nvidia-smi > "$DEST/nvidia-smi.txt" 2>&1 || true
  BATCHES="1 16"
  ARGS=(model=llava15_7b bench.device=cuda bench.dtype=bf16 bench.warmup=1 bench.repeats=3 bench.new_tokens=16)
fi

for B in $BATCHES; do
  echo "== batch $B ==" | tee -a "$DEST/log.txt"
  # a batch size that runs out of time or memory leaves its rows so far and the next one still runs
  timeout 330 "$PYTHON" -m train bench "arch=$ARCHS" "${ARGS[@]}" bench.batch="$B" bench.hf=true "bench.out=$DEST" \
    2>&1 | tee -a "$DEST/log.txt" || echo "batch $B stopped early (exit ${PIPESTATUS[0]})" | tee -a "$DEST/log.txt"
done
ls "$DEST"/bench-*.json
