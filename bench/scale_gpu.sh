#!/usr/bin/env bash
# Issue #17 item 4 on one GPU (prepared; it has not run yet: no GPU was lent): SD 1.5 size at 4x64x64, bf16-mixed,
# batch 8, images/s and peak GPU memory of our DMD setup (LoRA fake score, bf16 frozen base) against DMD2's three full
# UNets; then whether SDXL size fits on one 80 GB GPU with ZeRO-2 + the LoRA fake score. About 5-10 minutes on one
# H100 (writing the random SD 1.5 and SDXL folders included: 14 GB of disk under runs/bench-scale-models).
# First, in about a minute, bench/sampling_gpu.sh: `sample` / `evaluate` --device cuda --dtype bfloat16 against the CPU
# (SAMPLING_CHECK=0 skips it); the scale bench then gets the rest of the 590 s.
#   bench/scale_gpu.sh                 # -> bench/results/sampling_gpu.{md,json} and bench/results/scale_gpu.{md,json}
#   PYTHON=/path/to/python bench/scale_gpu.sh --steps 5
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
nvidia-smi -L
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: torch sees no CUDA device')"
export WANDB_MODE=disabled PYTHONWARNINGS=ignore
start=$SECONDS
if [ "${SAMPLING_CHECK:-1}" != 0 ]; then
  PYTHON="$PY" SAMPLING_CHECK_TIMEOUT=150 bench/sampling_gpu.sh || echo "bench/sampling_gpu.sh failed (see above); the scale bench runs anyway" >&2
fi
exec timeout $((590 - (SECONDS - start))) "$PY" -m bench.scale_gpu "$@"
