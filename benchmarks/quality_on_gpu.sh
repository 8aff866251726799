#!/usr/bin/env bash
# benchmarks/quality.py on a lent GPU machine: several (recipe, seed) pairs at once (the loaders, not the GPU,
# bound a 28-px run), in float32 like the CPU runs, so that the 4 recipes x 3 seeds take minutes, not the hours
# of the 2-core reference machine. The recipes' budgets (epochs) stay the ones sized for equal time there.
# Usage: FMNIST=dir JOBS=4 bash benchmarks/quality_on_gpu.sh [quality.py arguments]
# lightly and a faiss-cpu wheel travel in $PKGS as for gpu_check.sh (see its header).
set -uo pipefail
cd "$(dirname "$0")/.."
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
JOBS=${JOBS:-4}
WORKERS=${WORKERS:-3}
source benchmarks/device_env.sh
exec python3 benchmarks/quality.py --jobs "$JOBS" --out "${OUTDIR:-benchmarks/out/quality_gpu}" "$@" \
  --set data.root="$FMNIST" data.num_workers="$WORKERS" train.mixed_precision=no
