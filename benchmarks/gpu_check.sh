#!/usr/bin/env bash
# One check of BatchSSL on a machine with a CUDA GPU, bounded to about 9 minutes:
#  1b. one CIFAR-10-sized real-data epoch through the device pipeline (50,000 x 32 px uint8 on the GPU,
#      ResNet-18, batch 512, bf16): its seconds, and the real-data / synthetic step rate;
#  1.  CIFAR-10-sized training throughput (ResNet-18, CIFAR stem, batch 512) for SimSiam and MoCo v3: fp32,
#      channels_last, bf16, bf16 + channels_last, without BatchFormer, and real views (DeviceViews);
#  1c. train.compile=backbone against eager (bf16 + channels_last), CIFAR-10-sized MoCo v3 + BatchFormer;
#  1d. JPEG folders: the split pipeline's pairs/s at 224 px (no model) with data.decode=cpu (loader workers decode)
#      and gpu (nvJPEG on the device), 8 and 2 loader workers, on real photos; then one short pretrain.py epoch
#      with data.decode=gpu (the device decode through the trainer);
#  2.  a real pretraining run on the GPU in bf16 (8192 Fashion-MNIST images, 2 epochs, kNN monitor), then knn_eval;
#  3.  with two or more GPUs: the 2-process (NCCL) vs 1-process loss at step 1.
# Each part gets its own time cap and never more than what is left of the budget (BUDGET_S, default 540 s), so one
# slow or hung part cannot take the others' time; a part that would pass it is cut short or skipped.
#
# Usage: bash benchmarks/gpu_check.sh [FASHION_MNIST_DIR] > gpu_check.txt
#   FASHION_MNIST_DIR holds Fashion-MNIST's idx files (default: where `make setup` put them: data/ or Debian's
#   dataset-fashion-mnist). PYTHON picks the interpreter (default .venv/bin/python, else python3): see
#   benchmarks/device_env.sh for what it needs. The CIFAR-10-sized parts use random images of that shape, so they
#   need no CIFAR-10 download. BENCHMARKS.md says how its figures were read from this output.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET_S=${BUDGET_S:-540}  # seconds for the whole check, from the start (bash's SECONDS)
capped() {  # capped CAP_S command...: `timeout` with min(CAP_S, time left); skipped when under 15 s are left
  local left=$((BUDGET_S - SECONDS)) cap=$1; shift
  if [ "$left" -lt 15 ]; then echo "skipped (BUDGET_S=$BUDGET_S s is spent): $*"; return 124; fi
  timeout $((cap < left ? cap : left)) "$@"
}
FMNIST_ROOT=()
[ $# -ge 1 ] && FMNIST_ROOT=("data.root=$1")
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")

echo "== 1b. a CIFAR-10-sized real-data epoch through the device pipeline (50,000 x 32 px, ResNet-18, batch 512, bf16)"
capped 120 "$PYTHON" benchmarks/device_epoch.py --config recipes/cifar10/mocov3_bf.yaml

echo "== 1. throughput, CIFAR-10 sized (ResNet-18 CIFAR stem, 32 px, batch 512)"
CIFAR="data.name=cifar10 model.width=1.0 model.stem=cifar train.batch_size=512"
capped 100 "$PYTHON" benchmarks/train_throughput.py --config recipes/fashion_mnist/simsiam_bf.yaml $CIFAR \
  method.proj_hidden_dim=2048 method.proj_dim=2048 method.proj_layers=2 method.pred_hidden_dim=512 \
  --real --repeats 3 --steps 10 --warmup 3
capped 100 "$PYTHON" benchmarks/train_throughput.py --config recipes/fashion_mnist/mocov3_bf.yaml $CIFAR \
  method.proj_hidden_dim=4096 method.proj_dim=256 method.proj_layers=3 method.temperature=0.2 \
  --real --repeats 3 --steps 10 --warmup 3

echo "== 1c. torch.compile of the backbone vs eager (bf16 + channels_last, CIFAR-10 sized MoCo v3 + BatchFormer)"
capped 120 "$PYTHON" benchmarks/train_throughput.py --config recipes/cifar10/mocov3_bf.yaml \
  --variants bf16+cl,bf16+cl+compile --repeats 3 --steps 10 --warmup 4 --no-flops

echo "== 1d. JPEG folder at 224 px: data.decode=cpu (workers decode) vs gpu (nvJPEG on the device), no model"
PHOTOS=$(mktemp -d)
"$PYTHON" -c "import simplejpeg; print('simplejpeg', simplejpeg.__version__)" || echo "no simplejpeg: cpu decodes with PIL"
capped 45 "$PYTHON" benchmarks/make_photo_folder.py "$PHOTOS/photos" --train 1024 --val 64
for w in 8 2; do
  capped 60 "$PYTHON" benchmarks/loader_speed.py "$PHOTOS/photos" --decode cpu gpu --sizes 224 --workers $w \
    --batch 128 --repeats 3
done
capped 60 "$PYTHON" pretrain.py --config recipes/imagenet/mocov3_r50.yaml data.root="$PHOTOS/photos" \
  data.decode=gpu data.num_workers=8 model.arch=resnet18 train.batch_size=128 train.epochs=1 \
  train.log_every_n_steps=4 monitor.enabled=false output_dir="$PHOTOS/run" 2>&1 | grep -v "it/s" | tail -3
[ -f "$PHOTOS/run/metrics.jsonl" ] && tail -2 "$PHOTOS/run/metrics.jsonl"

echo "== 2. real run: pretrain.py in bf16 on the GPU, kNN monitor"
OUT=$(mktemp -d)
capped 120 "$PYTHON" pretrain.py --config recipes/fashion_mnist/simsiam_bf.yaml ${FMNIST_ROOT[@]+"${FMNIST_ROOT[@]}"} \
  data.limit=8192 data.val_limit=2000 data.num_workers=6 train.epochs=2 train.mixed_precision=bf16 \
  train.log_every_n_steps=8 output_dir="$OUT/run" 2>&1 | grep -v "it/s" | tail -5
[ -f "$OUT/run/metrics.jsonl" ] && "$PYTHON" -c "
import json, sys
for line in open('$OUT/run/metrics.jsonl'):
    m = json.loads(line); print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()})
" | tail -4
capped 60 "$PYTHON" -m knn_eval --run "$OUT/run" --k 200 2>&1 | grep -v "it/s" | tail -4

if [ "$NGPU" -ge 2 ]; then
  echo "== 3. two processes (NCCL) vs one at step 1"
  for n in 1 2; do
    capped 120 "$PYTHON" -m torch.distributed.run --nproc_per_node $n pretrain.py \
      --config recipes/fashion_mnist/mocov3_bf.yaml ${FMNIST_ROOT[@]+"${FMNIST_ROOT[@]}"} data.limit=1024 \
      data.num_workers=2 train.epochs=1 train.batch_size=256 batchformer.gather=true batchformer.dropout=0.0 \
      monitor.enabled=false train.log_every_n_steps=1 \
      output_dir="$OUT/p$n" > /dev/null 2>&1
    head -1 "$OUT/p$n/metrics.jsonl"
  done
else
  echo "== 3. skipped: one GPU"
fi
