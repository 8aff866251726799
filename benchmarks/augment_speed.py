"""Augmentation speed: the per-sample PIL path of the loader workers vs batchssl.views.DeviceViews, side by side.

  lightly   data.pipeline=workers: data.TwoViews over data.ArrayImages (per sample: PIL image from the uint8
            array, seed torch/random/numpy from (seed, epoch, index), augment.view_transforms' torchvision / lightly
            chains built from the view specs), on one core (torch.set_num_threads(1)), as one DataLoader worker
  device    DeviceViews on a batch gathered from a uint8 dataset tensor held on the device: parameters drawn on
            the CPU, every view made with batched ops; on the CPU with --threads torch threads (default one, the
            lightly path's share) and on CUDA when available

Random uint8 images, 28 px 1 channel (Fashion-MNIST), 32 px RGB (CIFAR), 96 px RGB (STL-10), each with the
dataset's recipe defaults (blur only from 64 px). Throughput is images per second, all their views made (pairs
of views by default; --local-crops N adds N local crops per image), the median of the repeats; ratio = device /
lightly, both measured in this run.

    python benchmarks/augment_speed.py              # MoCo v3 (BYOL) recipe, batches 256 and 512
    python benchmarks/augment_speed.py --quick      # fewer images and repeats
    python benchmarks/augment_speed.py --method simsiam --batches 512 --threads 1 2
    python benchmarks/augment_speed.py --local-crops 6  # multi-crop: 2 global + 6 local views per image
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ssl"))

from batchssl.augment import view_transforms
from batchssl.config import Config
from batchssl.data import INFO, ArrayImages, TwoViews
from batchssl.views import DeviceViews

DATASETS = ("fashion_mnist", "cifar10", "stl10")


def random_images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)


def lightly_pairs_per_s(cfg: Config, info, images: torch.Tensor, count: int, repeats: int) -> float:
    array = images.permute(0, 2, 3, 1).numpy()
    array = array[..., 0] if info.in_channels == 1 else array
    dataset = TwoViews(
        ArrayImages(np.ascontiguousarray(array), np.zeros(len(array))), view_transforms(cfg, info), seed=0
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for r in range(repeats + 1):  # the first pass warms up
            start = time.perf_counter()
            for i in range(count):
                dataset[(r, i % len(dataset))]
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return count / statistics.median(times[1:])


def device_pairs_per_s(
    cfg: Config, info, images: torch.Tensor, batch: int, repeats: int, device: str, threads: int
) -> float:
    stored = images.to(device)
    views = DeviceViews(cfg, info, global_batch=batch)
    g = torch.Generator().manual_seed(1)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = []
        for step in range(repeats + 1):  # the first call warms up
            index = torch.randint(0, len(stored), (batch,), generator=g).to(device)
            sync()
            start = time.perf_counter()
            views(stored[index], seed=0, epoch=0, step=step)
            sync()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(saved)
    return batch / statistics.median(times[1:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=["mocov3", "simsiam"], default="mocov3")
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="torch threads of the CPU device runs")
    parser.add_argument("--local-crops", type=int, default=0, help="local crops per image (augment.local_crops)")
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats")
    args = parser.parse_args(argv)

    cfg = Config()
    cfg.method.name = args.method
    cfg.augment.local_crops = args.local_crops
    repeats = 2 if args.quick else 5
    cpu_threads = torch.get_num_threads()
    devices = [("cpu", threads) for threads in args.threads]
    if torch.cuda.is_available():
        devices.append(("cuda", cpu_threads))
    print(
        f"# torch {torch.__version__}, {os.cpu_count()} CPUs, {cpu_threads} torch threads, "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA'}; recipe: {args.method}, "
        f"views per image: 2 global + {args.local_crops} local"
    )
    unit = "pairs/s" if args.local_crops == 0 else "images/s"
    header = (
        f"{'dataset':<14}{'size':>5}{'ch':>4}{'lightly/s':>11}  {'device':<7}{'threads':>8}{'batch':>7}"
        f"{unit:>10}{'ratio':>8}"
    )
    print(header)
    print("-" * len(header))
    for name in args.datasets:
        info = INFO[name]
        size, channels = info.image_size, info.in_channels
        images = random_images(2048, channels, size)
        # lightly: enough samples for ~1 s per repeat at these sizes (fewer with --quick).
        count = {28: 600, 32: 500, 96: 150}[size] // (3 if args.quick else 1)
        lightly = lightly_pairs_per_s(cfg, info, images, count, repeats)
        for device, threads in devices:
            for batch in args.batches:
                ours = device_pairs_per_s(cfg, info, images, batch, repeats, device, threads)
                print(
                    f"{name:<14}{size:>5}{channels:>4}{lightly:>11,.0f}  {device:<7}{threads:>8}{batch:>7}"
                    f"{ours:>10,.0f}{ours / lightly:>7.1f}x",
                    flush=True,
                )


if __name__ == "__main__":
    main()
