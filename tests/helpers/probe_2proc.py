"""Run under `torchrun --nproc_per_node 2`: the augmented linear probe on a CPU Accelerator.

`build()` is also imported by tests/test_linear_probe.py, which runs the same probe on one process.
Usage: probe_2proc.py OUT_DIR  ->  OUT_DIR/result.pt (rank 0's metrics), OUT_DIR/ckpt/linear_probe.pt
"""

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

NUM_CLASSES, FEATURE_DIM = 4, 8
PROBE = dict(num_classes=NUM_CLASSES, feature_dim=FEATURE_DIM)
SETTINGS = dict(epochs=2, batch_size=16, base_lr=16.0, seed=0)  # lr 1.0


def settings(**changes):
    from batchssl.eval.linear_augmented import AugmentedProbeSettings

    return AugmentedProbeSettings(**{**SETTINGS, **changes})


def make_images(n: int, seed: int) -> TensorDataset:
    """Class c brightens colour channel c % 3 (and class 3 darkens everything): learnable by a linear head."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    images = 0.5 * torch.randn(n, 3, 8, 8, generator=g)
    for c in range(NUM_CLASSES):
        if c < 3:
            images[labels == c, c] += 1.0
        else:
            images[labels == c] -= 1.0
    return TensorDataset(images, labels)


def build() -> tuple[nn.Module, TensorDataset, TensorDataset]:
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, FEATURE_DIM, 3, padding=1), nn.BatchNorm2d(FEATURE_DIM), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
    )
    return backbone, make_images(64, seed=1), make_images(32, seed=2)


if __name__ == "__main__":
    from accelerate import Accelerator

    from batchssl.eval.linear_augmented import train_augmented_probe

    accelerator = Accelerator(cpu=True)
    backbone, train_set, test_set = build()
    out = Path(sys.argv[1])
    result = train_augmented_probe(
        backbone,
        train_set,
        test_set,
        accelerator=accelerator,
        checkpoint_dir=out / "ckpt",
        settings=settings(),
        **PROBE,
    )
    if accelerator.is_main_process:
        torch.save(result, out / "result.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroy the gloo group: tearing it down at interpreter exit can abort a rank
