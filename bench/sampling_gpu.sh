#!/usr/bin/env bash
# `sample` and `evaluate` with --device cuda and --dtype bfloat16 / float16 on tiny models (the digits teacher fitted on
# the CPU, a random SD 1.5 folder), checked against the CPU in float32: samples within 1e-2 (float32, TF32) and 5e-2
# (half precision) of the CPU's relative to their range, FD within 2 % and 10 %, FID (random weights) finite, and
# every network, the prompt encoder, the VAE and the feature network on the GPU. Prepared, not yet run on a GPU. About
# a minute; exit 1 when a check fails. bench/scale_gpu.sh runs it first.
#   bench/sampling_gpu.sh                 # -> bench/results/sampling_gpu.{md,json}
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: torch sees no CUDA device')"
export WANDB_MODE=disabled PYTHONWARNINGS=ignore
exec timeout "${SAMPLING_CHECK_TIMEOUT:-240}" "$PY" -m bench.sampling_gpu "$@"
