"""A CIFAR-10-sized epoch through the device pipeline, against the same steps on fixed synthetic views.

50,000 random uint8 images of 32 px (timing only: the pixel values do not change the work) held on the device,
the CIFAR-10 MoCo v3 + BatchFormer recipe (ResNet-18, CIFAR stem, batch 512, bf16 where the device has it), one
epoch of real training steps (both views made by batchssl.views.DeviceViews every step), then as many steps on
one fixed pair of synthetic views. Prints the epoch's seconds and the real / synthetic ratio of the step rate.

    python benchmarks/device_epoch.py [--images 50000] [--config recipes/cifar10/mocov3_bf.yaml] [key=value ...]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from batchssl.backbones import build_backbone
from batchssl.config import load_config
from batchssl.data import dataset_info
from batchssl.distributed import make_accelerator
from batchssl.methods import build_method
from batchssl.optim import apply_lr, build_optimizer, peak_lr, warmup_cosine
from batchssl.pipeline import DevicePipeline
from batchssl.train import resolve_precision, train_step, uses_channels_last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/cifar10/mocov3_bf.yaml")
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, ["train.mixed_precision=bf16", *args.overrides])
    precision = resolve_precision(cfg.train.mixed_precision)
    accelerator = make_accelerator(mixed_precision=precision)
    info = dataset_info(cfg.data)
    rng = np.random.default_rng(0)
    shape = (args.images, info.image_size, info.image_size) + ((info.in_channels,) if info.in_channels > 1 else ())
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    labels = rng.integers(0, info.num_classes, args.images)
    pipeline = DevicePipeline(cfg, info, images, labels, accelerator.device)

    torch.manual_seed(0)
    backbone, feature_dim = build_backbone(cfg.model, info.in_channels, info.image_size)
    if uses_channels_last(cfg):
        backbone = backbone.to(memory_format=torch.channels_last)
    method = build_method(cfg, backbone, feature_dim)
    optimizer = build_optimizer(method.parameter_groups(cfg.optim), cfg.optim)
    method, optimizer = accelerator.prepare(method, optimizer)
    method.train()
    steps = pipeline.steps_per_epoch
    peak = peak_lr(cfg)

    def step(i: int, views) -> torch.Tensor:
        apply_lr(optimizer, warmup_cosine(i, steps, 0, peak), peak)
        return train_step(method, optimizer, accelerator, views, i, steps, None)[1]

    def sync(values: torch.Tensor) -> None:
        values.tolist()

    batches = pipeline.batches(0)
    warm_views, _ = next(batches)
    for i in range(3):  # warm-up: allocations, cuDNN autotuning
        sync(step(i, warm_views))
    start = time.perf_counter()
    for i, (views, _) in enumerate(pipeline.batches(1)):
        values = step(i, views)
    sync(values)
    real = time.perf_counter() - start

    start = time.perf_counter()
    for i in range(steps):
        values = step(i, warm_views)
    sync(values)
    synthetic = time.perf_counter() - start
    print(f"{accelerator.device} ({torch.cuda.get_device_name() if accelerator.device.type == 'cuda' else 'CPU'}), "
          f"precision {precision}, {args.images} images of {info.image_size} px, batch {cfg.train.batch_size}, "
          f"{cfg.model.arch} {cfg.method.name}{' + BatchFormer' if cfg.batchformer.enabled else ''}")
    print(f"real-data epoch ({steps} steps, views made on the device): {real:.2f} s, "
          f"{steps * cfg.train.batch_size / real:.0f} images/s")
    print(f"synthetic (fixed views, same steps): {synthetic:.2f} s; real / synthetic step rate {synthetic / real:.3f}x")


if __name__ == "__main__":
    main()
