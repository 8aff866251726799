"""Frozen-backbone feature extraction, on one process or sharded across the processes of an Accelerator."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

if TYPE_CHECKING:
    import accelerate

# Rows per all-gather call: bounds the device memory of the gather for large datasets (ImageNet: 1.28M rows).
_GATHER_ROWS = 8192


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    dataset,
    batch_size: int = 256,
    num_workers: int = 0,
    accelerator: accelerate.Accelerator | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "features",
) -> tuple[Tensor, Tensor]:
    """Features (N, D) float32 and labels (N,) int64 on CPU, in dataset order, of `dataset`'s (image, label) items.

    The backbone runs in eval mode on its own device (its modes are restored afterwards), under autocast to
    `dtype` when one is given. Its output is flattened to one vector per image.

    With an accelerator of P processes, process r computes the contiguous shard [r * S, (r + 1) * S) with
    S = ceil(N / P); the last shards are filled up to S with copies of the last index, so that every process
    runs the same number of batches and all shards have one shape for the all-gather. Concatenating the
    shards in rank order is then dataset order; the at most P - 1 filler rows at the end are dropped. Every
    process returns the full result.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot extract features of an empty dataset")
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    if accelerator is not None:
        backbone = accelerator.unwrap_model(backbone)  # a DDP wrapper would synchronise on every forward
    shard = math.ceil(n / world)
    indices = [min(i, n - 1) for i in range(rank * shard, (rank + 1) * shard)]

    device = next(backbone.parameters(), torch.empty(0)).device
    loader = DataLoader(
        Subset(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    is_main = accelerator is None or accelerator.is_main_process
    feats, labels = [], []
    with eval_mode(backbone), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for images, targets in tqdm(loader, desc=desc, disable=not (progress and is_main), dynamic_ncols=True):
            out = backbone(images.to(device, non_blocking=True))
            feats.append(out.flatten(1).float().cpu())
            labels.append(torch.as_tensor(targets).long().cpu())
    feats, labels = torch.cat(feats), torch.cat(labels)
    if world > 1:
        feats, labels = _gather_shards(feats, accelerator), _gather_shards(labels, accelerator)
    return feats[:n], labels[:n]


def _gather_shards(local: Tensor, accelerator: accelerate.Accelerator) -> Tensor:
    """(S, ...) on each process -> (P * S, ...) on every process, rank r's rows at [r * S, (r + 1) * S)."""
    world, shard = accelerator.num_processes, len(local)
    out = local.new_empty((world, shard, *local.shape[1:]))
    for start in range(0, shard, _GATHER_ROWS):
        part = local[start : start + _GATHER_ROWS]
        gathered = accelerator.gather(part.to(accelerator.device)).cpu()  # rank-major: (P * rows, ...)
        out[:, start : start + len(part)] = gathered.view(world, len(part), *local.shape[1:])
    return out.flatten(0, 1)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode inside, then every submodule's own previous mode (a frozen BN stays in eval, etc.)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
