"""Where each step's views come from (every view of `batchssl.views.view_specs`: two global, N local crops).

- `DevicePipeline` (data.pipeline: device, the default for in-memory datasets): the pretraining split lives once
  as a uint8 tensor on the training device, and every step makes the views there with batched operations
  (batchssl.views.DeviceViews). No loader workers, no per-image Python.
- `WorkerPipeline` (data.pipeline: workers; ImageFolder, or for comparison): per-sample torchvision / lightly
  transforms in DataLoader workers, built by `augment.view_transforms` from the same view specs.

Both deal the same images to the same steps: epoch e's order is a permutation seeded by (seed, e), cut to whole
global batches; global batch b is order[b*B:(b+1)*B], and process r of W takes its positions r, r+W, ... So a
step's images, and (with the device pipeline) its views, do not depend on the number of processes, and a resumed
run meets exactly the batches an uninterrupted one met.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from batchssl.config import Config
from batchssl.data import DatasetInfo, EpochShardSampler, TwoViews, epoch_order


class DevicePipeline:
    def __init__(
        self,
        cfg: Config,
        info: DatasetInfo,
        images: np.ndarray,
        labels: np.ndarray,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
    ):
        from batchssl.views import DeviceViews

        array = torch.tensor(np.asarray(images))  # a copy: the loaded array may be read-only
        array = array.unsqueeze(1) if array.ndim == 3 else array.permute(0, 3, 1, 2)  # (N, C, H, W)
        self.images = array.contiguous().to(device)
        self.labels = torch.as_tensor(labels, dtype=torch.long).to(device)
        self.views = DeviceViews(cfg, info, global_batch=cfg.train.batch_size)
        self.seed, self.batch, self.rank, self.world = cfg.seed, cfg.train.batch_size, rank, world
        self.positions = torch.arange(rank, self.batch, world)  # this process's rows of every global batch
        self.has_labels, self.has_unlabelled = bool((labels >= 0).any()), bool((labels < 0).any())  # -1: none
        self.size = len(self.images)

    @property
    def steps_per_epoch(self) -> int:
        return self.size // self.batch

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[list[Tensor], Tensor]]:
        """Steps start.. of the epoch (start > 0: resumed from a step checkpoint)."""
        order = epoch_order(self.size, self.batch, self.seed, epoch).view(-1, self.batch)[:, self.positions]
        order = order.to(self.images.device, non_blocking=True)
        for step in range(start, self.steps_per_epoch):
            rows = order[step]
            views = self.views(self.images[rows], self.seed, epoch, step, self.positions, self.batch)
            yield views, self.labels[rows]


class WorkerPipeline:
    def __init__(
        self,
        cfg: Config,
        info: DatasetInfo,
        dataset,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
        channels_last: bool = False,
    ):
        from batchssl.augment import view_transforms

        self.sampler = EpochShardSampler(len(dataset), cfg.train.batch_size, cfg.seed, rank, world)
        self.loader = DataLoader(
            TwoViews(dataset, view_transforms(cfg, info), cfg.seed),
            sampler=self.sampler,
            batch_size=cfg.train.batch_size // world,
            drop_last=True,
            num_workers=cfg.data.num_workers,
            persistent_workers=cfg.data.num_workers > 0,
            pin_memory=device.type == "cuda",
        )
        self.device, self.channels_last = device, channels_last
        # Only STL-10's pretraining split mixes unlabelled images (label -1) in; ImageFolder is all labelled.
        self.has_labels, self.has_unlabelled = info.num_classes >= 2, cfg.data.name == "stl10"

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch()

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[list[Tensor], Tensor]]:
        """Steps start.. of the epoch (start > 0: resumed from a step checkpoint; the sampler skips the rest)."""
        self.sampler.set_epoch(epoch, start)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for views, labels in self.loader:
            yield (
                [v.to(self.device, non_blocking=True).contiguous(memory_format=fmt) for v in views],
                torch.as_tensor(labels).to(self.device, non_blocking=True),
            )
