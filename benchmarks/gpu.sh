#!/usr/bin/env bash
# The whole benchmark suite at paper size (CLIP ViT-L/14 at 224 px + TinyLlama-1.1B shapes, random weights) in
# bfloat16 on one GPU, in one command. Budget: under 8 minutes on an H100 (the suite itself stops at TIMEOUT).
#
#   benchmarks/gpu.sh                      # on a GPU machine; results in benchmarks/results/gpu-paper-bfloat16/
#   SIZE=tiny DEVICE=cpu DTYPE=float32 benchmarks/gpu.sh --quick      # dry run of this script on a CPU
#
# Extra arguments go to `python -m benchmarks.run` (e.g. --only, --reps). Prints the GPU, then the results table.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
SIZE=${SIZE:-paper}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
REPS=${REPS:-5}
TIMEOUT=${TIMEOUT:-480}
OUT=${OUT:-benchmarks/results/gpu-$SIZE-$DTYPE}

if [[ "$DEVICE" == cuda* ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, \
'| cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"

start=$(date +%s)
timeout --signal=INT "$TIMEOUT" "$PY" -m benchmarks.run --size "$SIZE" --device "$DEVICE" --dtype "$DTYPE" \
  --reps "$REPS" --output "$OUT" "$@"
echo "gpu.sh: suite finished in $(( $(date +%s) - start )) s; results in $OUT"
