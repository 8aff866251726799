"""Run under `torchrun --nproc_per_node 2`: extract features with a CPU Accelerator and save every rank's result.

`build()` is also imported by tests/test_features.py, so both sides see the same backbone and dataset.
Usage: extract_2proc.py OUT_DIR  ->  OUT_DIR/rank{r}.pt = {"feats", "labels"}
"""

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

NUM_IMAGES = 37  # not divisible by 2: the last shard is padded and the padding must be dropped


def build() -> tuple[nn.Module, TensorDataset]:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
    bn = backbone[1]
    bn.running_mean.uniform_(-1, 1)  # eval and train mode give different outputs: a mode mistake shows
    bn.running_var.uniform_(0.5, 2)
    images = torch.randn(NUM_IMAGES, 3, 8, 8)
    labels = torch.arange(NUM_IMAGES)  # label i at row i: the order of the result is visible
    return backbone, TensorDataset(images, labels)


if __name__ == "__main__":
    from accelerate import Accelerator

    from batchssl.eval.features import extract_features

    accelerator = Accelerator(cpu=True)
    backbone, dataset = build()
    feats, labels = extract_features(backbone, dataset, batch_size=4, accelerator=accelerator)
    torch.save({"feats": feats, "labels": labels}, Path(sys.argv[1]) / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroy the gloo group: tearing it down at interpreter exit can abort a rank
