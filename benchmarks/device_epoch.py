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

from batchssl.build import build_training, resolve_precision
from batchssl.config import load_config
from batchssl.data import dataset_info
from batchssl.distributed import make_accelerator
from batchssl.pipeline import DevicePipeline
from batchssl.train import train_step


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

    # The trainer's own model, optimiser and schedule (seeded with cfg.seed), on these images.
    run = build_training(cfg, accelerator, pipeline=pipeline)
    method, optimizer, schedule = run.method, run.optimizer, run.schedule
    method.train()
    steps = pipeline.steps_per_epoch

    def step(i: int, views) -> torch.Tensor:
        schedule.apply(optimizer, i)
        return train_step(method, optimizer, accelerator, views, i, schedule.total_steps, cfg.train)[1]

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
    print(
        f"{accelerator.device} ({torch.cuda.get_device_name() if accelerator.device.type == 'cuda' else 'CPU'}), "
        f"precision {precision}, {args.images} images of {info.image_size} px, batch {cfg.train.batch_size}, "
        f"{cfg.model.arch} {cfg.method.name}{' + BatchFormer' if cfg.batchformer.enabled else ''}"
    )
    print(
        f"real-data epoch ({steps} steps, views made on the device): {real:.2f} s, "
        f"{steps * cfg.train.batch_size / real:.0f} images/s"
    )
    print(f"synthetic (fixed views, same steps): {synthetic:.2f} s; real / synthetic step rate {synthetic / real:.3f}x")


if __name__ == "__main__":
    main()
