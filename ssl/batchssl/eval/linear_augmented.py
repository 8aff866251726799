"""Linear probe with augmentation (the MoCo v3 / SimSiam protocol): the frozen backbone sees freshly augmented
training images every epoch and one linear head is trained on its features, then scored on the test split."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from batchssl.errors import UserError
from batchssl.eval.features import eval_mode, extract_features
from batchssl.eval.linear_cached import topk_accuracy
from batchssl.files import atomic_write
from batchssl.optim import LARS, warmup_cosine

if TYPE_CHECKING:
    import accelerate

CHECKPOINT_NAME = "linear_probe.pt"
STATS_IMAGES = 10_000  # training images whose features fix the standardisation


@dataclass(frozen=True)
class AugmentedProbeSettings:
    """MoCo v3: sgd, base_lr 0.1 (ResNet) or 3 (ViT), batch 1024; SimSiam: lars, base_lr 0.02, batch 4096."""

    epochs: int = 90
    batch_size: int = 256  # global, split evenly over the processes
    base_lr: float = 0.1  # peak lr = base_lr * batch_size / 256, per-step cosine to 0
    optimizer: str = "sgd"  # sgd | lars
    weight_decay: float = 0.0
    momentum: float = 0.9
    seed: int = 0
    standardize: bool = True


class BackboneChangedError(RuntimeError):
    """The frozen backbone's weights or buffers changed while a probe trained on it: its numbers are invalid."""


def state_fingerprint(module: nn.Module) -> dict[str, str]:
    """SHA-256 of every parameter and buffer (BatchNorm running statistics included), by state_dict name."""
    return {
        name: hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
        for name, t in module.state_dict().items()
    }


def check_backbone_unchanged(module: nn.Module, fingerprint: dict[str, str]) -> None:
    """Raise BackboneChangedError naming the tensors that differ from `fingerprint`."""
    now = state_fingerprint(module)
    changed = sorted(name for name in fingerprint.keys() | now.keys() if fingerprint.get(name) != now.get(name))
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise BackboneChangedError(
            f"the frozen backbone changed during the linear probe ({shown}); its results are invalid"
        )


def train_augmented_probe(
    backbone: nn.Module,
    train_dataset,
    test_dataset,
    num_classes: int,
    feature_dim: int,
    settings: AugmentedProbeSettings = AugmentedProbeSettings(),
    accelerator: accelerate.Accelerator | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    num_workers: int = 0,
    progress: bool = False,
    return_predictions: bool = False,
) -> dict:
    """Train a linear head on a frozen backbone (MoCo v3 / SimSiam protocol) and score it on `test_dataset`.

    `batch_size` is global (split evenly over the accelerator's processes); the peak lr is
    base_lr * batch_size / 256, decayed by a per-step cosine. MoCo v3: optimizer="sgd", base_lr 0.1 (ResNet)
    or 3 (ViT), batch 1024; SimSiam: optimizer="lars", base_lr 0.02, batch 4096. The head is nn.Linear with
    N(0, 0.01) weights and zero bias. The backbone runs in eval mode without gradients, under autocast to
    `dtype` if given; it is moved to the accelerator's device when there is one. Its weights and buffers are
    fingerprinted at the start and checked at the end (BackboneChangedError if anything changed).

    `standardize`: the head sees (features - mean) / std per dimension, with mean and variance measured once
    on the features of up to STATS_IMAGES training images (a seeded subset, as `train_dataset` augments them):
    the non-affine BatchNorm that MAE puts before its probe head, with fixed statistics as in the cached probe.
    Without it the best lr depends on the backbone's feature scale (a 1/4-width ResNet's pooled features are
    small), and one base lr cannot fit all backbones. The head stays linear in the raw features (the shift and
    scale fold into its weight and bias). The statistics are kept in the checkpoint, so a resumed run uses the
    same ones.

    With `checkpoint_dir`, head + optimizer + finished epochs are saved after each epoch and a later call with
    the same settings and backbone resumes from them. The training order is a function of (seed, epoch), so a
    resumed run trains on the same batches as an uninterrupted one.

    Returns {"top1", "top5", "lr", "epochs", "train_loss"} (train_loss: mean over the last epoch trained here,
    NaN if nothing was left to train). With `return_predictions` also "test_predictions" (the head's top-1 class
    of every test image, int64, CPU) and "test_labels" (their labels), e.g. for per_class_report.
    """
    epochs, batch_size, seed = settings.epochs, settings.batch_size, settings.seed
    if settings.optimizer not in ("sgd", "lars"):
        raise ValueError(f"optimizer must be 'sgd' or 'lars', got {settings.optimizer!r}")
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    is_main = rank == 0
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {world} processes")
    if accelerator is not None:  # the backbone is never trained, so never DDP-wrapped: plain module on the device
        backbone = accelerator.unwrap_model(backbone).to(accelerator.device)
    device = next(backbone.parameters()).device
    fingerprint = state_fingerprint(backbone)

    head = nn.Linear(feature_dim, num_classes)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(0.01 * torch.randn(head.weight.shape, generator=generator))
        head.bias.zero_()
    head.to(device)
    peak_lr = settings.base_lr * batch_size / 256
    if settings.optimizer == "sgd":
        opt = torch.optim.SGD(
            head.parameters(), lr=peak_lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
    else:  # SimSiam's probe: LARS at weight decay 0 still adapts the weight matrix
        opt = LARS(
            head.parameters(),
            lr=peak_lr,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
            trust_without_decay=True,
        )
    identity = {**asdict(settings), "num_classes": num_classes, "feature_dim": feature_dim}
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    start_epoch, stats = _resume(ckpt_path, head, opt, identity, fingerprint) if ckpt_path is not None else (0, None)
    if stats is None:
        stats = (
            feature_stats(
                backbone, train_dataset, feature_dim, seed, max(batch_size // world, 1), num_workers, accelerator, dtype
            )
            if settings.standardize
            else (torch.zeros(feature_dim), torch.ones(feature_dim))
        )
    mean, inv_std = (t.to(device) for t in stats)
    if accelerator is not None:
        head, opt = accelerator.prepare(head, opt)

    # Shuffled from (seed, epoch), sharded by rank; padded with a few repeats so all ranks take the same steps.
    sampler = DistributedSampler(train_dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    loader = DataLoader(
        train_dataset,
        batch_size=batch_size // world,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    total = epochs * len(loader)
    train_loss = float("nan")
    with eval_mode(backbone), _frozen_params(backbone):
        for epoch in range(start_epoch, epochs):
            sampler.set_epoch(epoch)
            head.train()
            loss_sum = torch.zeros(2, device=device)  # (sum of batch losses * batch size, samples)
            bar = tqdm(
                loader,
                desc=f"linear probe {epoch + 1}/{epochs}",
                disable=not (progress and is_main),
                dynamic_ncols=True,
            )
            for i, (images, labels) in enumerate(bar):
                for group in opt.param_groups:
                    group["lr"] = warmup_cosine(epoch * len(loader) + i, total, 0, peak_lr)
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    feats = backbone(images).flatten(1)
                loss = F.cross_entropy(head((feats.float() - mean) * inv_std), labels)
                opt.zero_grad(set_to_none=True)
                if accelerator is not None:
                    accelerator.backward(loss)
                else:
                    loss.backward()
                opt.step()
                loss_sum[0] += loss.detach() * len(labels)
                loss_sum[1] += len(labels)
                if not bar.disable:  # .item() waits for the device: only when someone looks
                    bar.set_postfix(loss=f"{loss.item():.4f}")
            if accelerator is not None:
                loss_sum = accelerator.reduce(loss_sum, reduction="sum")
            train_loss = (loss_sum[0] / loss_sum[1]).item()
            if ckpt_path is not None and is_main:
                _save(ckpt_path, _unwrap(head, accelerator), opt, epoch + 1, identity, fingerprint, stats)
            if accelerator is not None:
                accelerator.wait_for_everyone()

    feats, labels = extract_features(
        backbone,
        test_dataset,
        batch_size=max(batch_size // world, 1),
        num_workers=num_workers,
        accelerator=accelerator,
        dtype=dtype,
        progress=progress,
        desc="linear probe test",
    )
    check_backbone_unchanged(backbone, fingerprint)
    final = _unwrap(head, accelerator)
    with torch.no_grad():
        feats = (feats - stats[0]) * stats[1]  # the statistics live on the CPU, like the extracted features
        logits = F.linear(feats, final.weight.float().cpu(), final.bias.float().cpu())
        acc = topk_accuracy(logits, labels)
    result = {"top1": acc[1], "top5": acc[5], "lr": peak_lr, "epochs": epochs, "train_loss": train_loss}
    if return_predictions:
        result.update(test_predictions=logits.argmax(dim=1), test_labels=labels.long())
    return result


def feature_stats(
    backbone: nn.Module,
    dataset,
    feature_dim: int,
    seed: int,
    batch_size: int,
    num_workers: int = 0,
    accelerator: accelerate.Accelerator | None = None,
    dtype: torch.dtype | None = None,
    max_images: int = STATS_IMAGES,
) -> tuple[Tensor, Tensor]:
    """(mean, 1 / sqrt(var + 1e-6)) per feature dimension over a seeded subset of `dataset`, on CPU.

    The subset's rows are shared out over the processes and gathered by `extract_features`, so every process
    gets the same statistics. The variance is the biased one, as BatchNorm normalises with.
    """
    count = min(len(dataset), max_images)
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    feats, _ = extract_features(
        backbone,
        Subset(dataset, indices.tolist()),
        batch_size=batch_size,
        num_workers=num_workers,
        accelerator=accelerator,
        dtype=dtype,
        desc="probe statistics",
    )
    if feats.shape[1] != feature_dim:
        raise ValueError(f"the backbone gives {feats.shape[1]} features, the probe expects {feature_dim}")
    return feats.mean(0), torch.rsqrt(feats.var(0, unbiased=False) + 1e-6)


@contextmanager
def _frozen_params(module: nn.Module) -> Iterator[None]:
    """requires_grad False on every parameter inside the block, each one's own flag restored after."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _unwrap(head: nn.Module, accelerator) -> nn.Module:
    return accelerator.unwrap_model(head) if accelerator is not None else head


def _save(
    path: Path, head: nn.Module, opt, epochs_done: int, settings: dict, fingerprint: dict, stats: tuple[Tensor, Tensor]
) -> None:
    """Write to a temporary name, then rename: an interrupted save never replaces the last good checkpoint."""
    state = {
        "head": head.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": epochs_done,
        "settings": settings,
        "backbone": fingerprint,
        "feature_mean": stats[0],
        "feature_inv_std": stats[1],
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _resume(
    path: Path, head: nn.Module, opt, settings: dict, fingerprint: dict
) -> tuple[int, tuple[Tensor, Tensor] | None]:
    """Load head and optimizer from `path` if it exists; return (epochs already done, its feature statistics)."""
    if not path.is_file():
        return 0, None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["settings"] != settings:
        diff = sorted(
            k for k in settings.keys() | state["settings"].keys() if settings.get(k) != state["settings"].get(k)
        )
        raise UserError(
            f"{path} was written with other probe settings ({', '.join(diff)}); "
            "use another checkpoint directory or the same settings"
        )
    if state["backbone"] != fingerprint:
        raise UserError(f"{path} was written for another backbone; use another checkpoint directory")
    head.load_state_dict(state["head"])
    opt.load_state_dict(state["optimizer"])
    return state["epoch"], (state["feature_mean"], state["feature_inv_std"])
