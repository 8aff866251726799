#!/usr/bin/env bash
# One check for a lent GPU machine, under 8 minutes:
#  1. CIFAR-10-sized training throughput (ResNet-18, CIFAR stem, batch 512) for SimSiam and MoCo v3: fp32,
#     channels_last, bf16, bf16 + channels_last, without BatchFormer, and real views (DeviceViews);
#  1b. one CIFAR-10-sized real-data epoch through the device pipeline: its seconds, and real / synthetic steps;
#  1c. train.compile=backbone against eager (bf16 + channels_last), CIFAR-10 sized MoCo v3 + BatchFormer;
#  2. a real pretraining run on the GPU in bf16 (Fashion-MNIST subset, 2 epochs, kNN monitor with features in bf16);
#  3. with two or more GPUs: the 2-process (NCCL) vs 1-process loss check at step 1.
# Part 1b runs first (the issue's open GPU figures); a part that would pass the 8 minutes is cut short or skipped.
# Usage: bash benchmarks/gpu_check.sh [FASHION_MNIST_DIR]. The GPU machine's own python3 (with torch) runs it. On
# a machine without internet, carry lightly and a faiss-cpu wheel in $PKGS (default .devpkgs); they are installed
# into /tmp/site when missing. Prepared here with:
#   pip download --no-deps --only-binary :all: --python-version 3.12 -d .devpkgs faiss-cpu==1.15.1
#   cp -r .venv/lib/python3.11/site-packages/lightly .devpkgs/
# (lightly is pure Python; its own dependencies are on the GPU image already) and Fashion-MNIST's idx.gz files in
# .devpkgs/fmnist (31 MB: they fit in the 64 MiB a call carries beside the 18 MB faiss wheel; part 2 uses 8192
# images of them). benchmarks/device_env.sh does the installing, for quality_on_gpu.sh too.
set -uo pipefail
cd "$(dirname "$0")/.."
# The whole check stays under 8 minutes however slow a part is: each part gets at most its own cap and never more
# than what is left of 460 s from the start (bash's SECONDS), so one hung part cannot eat the call's time.
BUDGET_S=460
capped() {  # capped CAP_S command...: `timeout` with min(CAP_S, time left); skipped when under 15 s are left
  local left=$((BUDGET_S - SECONDS)) cap=$1; shift
  if [ "$left" -lt 15 ]; then echo "skipped (the 8-minute budget is spent): $*"; return 124; fi
  timeout $((cap < left ? cap : left)) "$@"
}
FMNIST=${1:-/usr/share/datasets/fashion-mnist}
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")

echo "== 1b. a CIFAR-10-sized real-data epoch through the device pipeline (50,000 x 32 px, ResNet-18, batch 512, bf16)"
capped 120 python3 benchmarks/device_epoch.py --config recipes/cifar10/mocov3_bf.yaml

echo "== 1. throughput, CIFAR-10 sized (ResNet-18 CIFAR stem, 32 px, batch 512)"
CIFAR="data.name=cifar10 model.width=1.0 model.stem=cifar train.batch_size=512"
capped 100 python3 benchmarks/train_throughput.py --config recipes/fashion_mnist/simsiam_bf.yaml $CIFAR \
  method.proj_hidden_dim=2048 method.proj_dim=2048 method.proj_layers=2 method.pred_hidden_dim=512 \
  --real --repeats 3 --steps 10 --warmup 3
capped 100 python3 benchmarks/train_throughput.py --config recipes/fashion_mnist/mocov3_bf.yaml $CIFAR \
  method.proj_hidden_dim=4096 method.proj_dim=256 method.proj_layers=3 method.temperature=0.2 \
  --real --repeats 3 --steps 10 --warmup 3

echo "== 1c. torch.compile of the backbone vs eager (bf16 + channels_last, CIFAR-10 sized MoCo v3 + BatchFormer)"
capped 120 python3 benchmarks/train_throughput.py --config recipes/cifar10/mocov3_bf.yaml \
  --variants bf16+cl,bf16+cl+compile --repeats 3 --steps 10 --warmup 4 --no-flops

echo "== 2. real run: pretrain.py in bf16 on the GPU, kNN monitor"
OUT=$(mktemp -d)
capped 120 python3 pretrain.py --config recipes/fashion_mnist/simsiam_bf.yaml data.root="$FMNIST" \
  data.limit=8192 data.val_limit=2000 data.num_workers=6 train.epochs=2 train.mixed_precision=bf16 \
  train.log_every_n_steps=8 output_dir="$OUT/run" 2>&1 | grep -v "it/s" | tail -5
[ -f "$OUT/run/metrics.jsonl" ] && python3 -c "
import json, sys
for line in open('$OUT/run/metrics.jsonl'):
    m = json.loads(line); print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()})
" | tail -4
capped 60 python3 -m knn_eval --run "$OUT/run" --k 200 2>&1 | grep -v "it/s" | tail -4

if [ "$NGPU" -ge 2 ]; then
  echo "== 3. two processes (NCCL) vs one at step 1"
  for n in 1 2; do
    capped 120 torchrun --nproc_per_node $n pretrain.py --config recipes/fashion_mnist/mocov3_bf.yaml \
      data.root="$FMNIST" data.limit=1024 data.num_workers=2 train.epochs=1 train.batch_size=256 \
      batchformer.gather=true batchformer.dropout=0.0 monitor.enabled=false train.log_every_n_steps=1 \
      output_dir="$OUT/p$n" > /dev/null 2>&1
    head -1 "$OUT/p$n/metrics.jsonl"
  done
else
  echo "== 3. skipped: one GPU"
fi
