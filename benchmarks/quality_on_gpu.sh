#!/usr/bin/env bash
# benchmarks/quality.py on a machine with a CUDA GPU: several (recipe, seed) runs at once (at 28 px the loaders,
# not the GPU, bound a run), in float32 like the CPU runs, so that the Fashion-MNIST recipes x 3 seeds take minutes
# instead of hours. The recipes keep their epochs (sized for a 2-core CPU). A run on another machine is another
# sample of the same recipe, not the same numbers: BENCHMARKS.md compares the two.
#
# Usage: [FMNIST=DIR] [JOBS=4] [WORKERS=3] [OUTDIR=benchmarks/out/quality_gpu] bash benchmarks/quality_on_gpu.sh \
#            [quality.py arguments, e.g. --recipes mocov3_bf mocov3 --seeds 0 1 2]
#   FMNIST: the folder of Fashion-MNIST's idx files (default: where `make setup` put them); JOBS runs at once, each
#   with WORKERS loader workers. PYTHON picks the interpreter: see benchmarks/device_env.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-4}
WORKERS=${WORKERS:-3}
source benchmarks/device_env.sh
ROOT=()
[ -n "${FMNIST:-}" ] && ROOT=("data.root=$FMNIST")
exec "$PYTHON" benchmarks/quality.py --jobs "$JOBS" --out "${OUTDIR:-benchmarks/out/quality_gpu}" "$@" \
  --set ${ROOT[@]+"${ROOT[@]}"} data.num_workers="$WORKERS" train.mixed_precision=no
