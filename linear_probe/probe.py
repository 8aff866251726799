"""Linear probes of a frozen backbone.

Two protocols:
- `train_cached_probes`: features extracted once, then a grid of linear heads (one per lr x weight decay)
  trained together on standardised features; the head is chosen on a validation part of the TRAINING split
  and only that head is scored on the test split. Fast: seconds on CPU for 60k x 512 features.
- `train_augmented_probe`: the MoCo v3 / SimSiam protocol. The frozen backbone sees augmented training images
  every epoch (the caller's dataset applies RandomResizedCrop + flip), one linear head is trained with SGD
  (or LARS, as SimSiam) and a cosine schedule, and is scored on the test set at the end. By default its
  features are standardised like the cached probe's (statistics fixed once, from training images), so both
  probes train the same kind of head and differ only in the augmentation.

Nothing here imports the trainer; `batchssl.features` is the only library part used.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from batchssl.errors import UserError
from batchssl.features import eval_mode, extract_features

if TYPE_CHECKING:
    import accelerate

CHECKPOINT_NAME = "linear_probe.pt"
STATS_IMAGES = 10_000  # training images whose features fix the augmented probe's standardisation


class BackboneChangedError(RuntimeError):
    """The frozen backbone's weights or buffers changed while a probe trained on it: its numbers are invalid."""


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracies in percent; k is clipped to the number of classes (top-5 of 3 classes is top-3)."""
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = ranked == labels.view(-1, 1)
    return {k: 100.0 * hits[:, :k].any(dim=1).double().mean().item() for k in ks}


def train_val_split(labels: Tensor, val_fraction: float = 0.1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Stratified split of a training set's indices into (train, val): val_fraction of every class to val."""
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_val = round(val_fraction * len(idx))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def cosine_factor(step: int, total_steps: int) -> float:
    """Cosine decay from 1 to 0 over total_steps (per-step schedule, no warmup: MoCo v3 / SimSiam linear eval)."""
    return 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))


# --------------------------------------------------------------------------------------------------------------
# Cached features: a grid of heads trained at once.
# --------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def train_cached_probes(
    train_feats: Tensor,
    train_labels: Tensor,
    val_feats: Tensor,
    val_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    num_classes: int,
    lrs: Sequence[float] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
    weight_decays: Sequence[float] = (0.0,),
    epochs: int = 100,
    batch_size: int = 1024,
    momentum: float = 0.9,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict:
    """Train one linear head per (lr, weight decay), pick the best on val top-1, score it on test.

    Features are standardised with the train part's per-dimension mean and variance (the BatchNorm without
    affine that MoCo v3 / MAE put before the head, with its statistics fixed since the features are fixed).
    All heads are one (D, H, C) weight tensor, so a step is a single matmul for the whole grid; each head gets
    exactly the gradient of its own mean cross-entropy. SGD with momentum and a per-step cosine schedule;
    weight decay on the weights, not the biases.

    Returns {"lr", "weight_decay", "val_top1", "test_top1", "test_top5", "grid": [{"lr", "weight_decay",
    "val_top1"}, ...]}. Ties on val go to the earlier grid entry (grid order: weight decay, then lr).
    """
    device = torch.device(device) if device is not None else train_feats.device
    mean, var = train_feats.mean(0), train_feats.var(0, unbiased=False)
    scale = torch.rsqrt(var + 1e-6)

    def prepare(feats: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return ((feats.float() - mean) * scale).to(device), labels.long().to(device)

    x, y = prepare(train_feats, train_labels)
    grid = [(lr, wd) for wd in weight_decays for lr in lrs]
    heads, dim = len(grid), x.shape[1]
    generator = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(dim, heads, num_classes, generator=generator)).to(device)
    bias = torch.zeros(heads, num_classes, device=device)
    lr = torch.tensor([g[0] for g in grid], device=device).view(1, heads, 1)
    wd = torch.tensor([g[1] for g in grid], device=device).view(1, heads, 1)
    buf_w, buf_b = torch.zeros_like(weight), torch.zeros_like(bias)

    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = epochs * steps_per_epoch
    for epoch in tqdm(range(epochs), desc="cached probes", disable=not progress, dynamic_ncols=True):
        order = torch.randperm(len(x), generator=generator).to(device)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            xb, yb = x[idx], y[idx]
            # One matmul for all heads: (B, D) @ (D, H * C). The gradient of each head's mean cross-entropy is
            # written out (softmax - onehot): three times faster than autograd at these tiny sizes.
            grad = (xb @ weight.view(dim, -1) + bias.view(-1)).view(len(idx), heads, num_classes).softmax(dim=2)
            grad[torch.arange(len(idx), device=device), :, yb] -= 1.0
            grad /= len(idx)
            grad_w = (xb.T @ grad.view(len(idx), -1)).view_as(weight)
            step_lr = lr * cosine_factor(epoch * steps_per_epoch + i, total)
            buf_w.mul_(momentum).add_(grad_w + wd * weight)
            buf_b.mul_(momentum).add_(grad.sum(dim=0))
            weight -= step_lr * buf_w
            bias -= step_lr.view(heads, 1) * buf_b

    val_top1 = _grid_top1(*prepare(val_feats, val_labels), weight, bias)
    # A diverged head (inf / NaN weights) must never be chosen, whatever its argmax happens to hit.
    finite = torch.isfinite(weight).all(dim=0).all(dim=1) & torch.isfinite(bias).all(dim=1)
    val_top1 = torch.where(finite.cpu(), val_top1, torch.full_like(val_top1, -1.0))
    best = int(val_top1.argmax())  # first maximum: the earlier grid entry wins ties
    tx, ty = prepare(test_feats, test_labels)
    test = topk_accuracy(tx @ weight[:, best] + bias[best], ty)
    return {
        "lr": grid[best][0],
        "weight_decay": grid[best][1],
        "val_top1": val_top1[best].item(),
        "test_top1": test[1],
        "test_top5": test[5],
        "grid": [{"lr": lr_, "weight_decay": wd_, "val_top1": acc} for (lr_, wd_), acc in zip(grid, val_top1.tolist())],
    }


def _grid_top1(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, chunk: int = 4096) -> Tensor:
    """Top-1 (percent, on CPU) of every head; in chunks, as (rows, heads, classes) logits can be large."""
    correct = torch.zeros(weight.shape[1], dtype=torch.long, device=x.device)
    for start in range(0, len(x), chunk):
        logits = torch.einsum("nd,dhc->nhc", x[start:start + chunk], weight) + bias
        correct += (logits.argmax(dim=2) == y[start:start + chunk, None]).sum(dim=0)
    return 100.0 * correct.cpu().double() / len(x)


# --------------------------------------------------------------------------------------------------------------
# Augmented protocol: one head, the backbone run on fresh augmentations every epoch.
# --------------------------------------------------------------------------------------------------------------

class LARS(torch.optim.Optimizer):
    """LARS as in SimSiam's linear evaluation: trust-ratio scaling of every weight matrix, momentum, no
    adaptation for 1-D parameters (biases). lightly's LARS skips the trust ratio when weight decay is 0,
    which is exactly SimSiam's linear-probe setting, so it would silently be plain SGD there."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = torch.norm(p), torch.norm(update)
                    trust = torch.where((p_norm > 0) & (u_norm > 0),
                                        group["trust_coefficient"] * p_norm / u_norm, torch.ones_like(p_norm))
                    update = update * trust
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])


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
        raise BackboneChangedError(f"the frozen backbone changed during the linear probe ({shown}); "
                                   "its results are invalid")


def train_augmented_probe(
    backbone: nn.Module,
    train_dataset,
    test_dataset,
    num_classes: int,
    feature_dim: int,
    epochs: int = 90,
    batch_size: int = 1024,
    base_lr: float = 0.1,
    optimizer: str = "sgd",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    num_workers: int = 0,
    accelerator: "accelerate.Accelerator | None" = None,
    checkpoint_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    standardize: bool = True,
    progress: bool = False,
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
    NaN if nothing was left to train).
    """
    if optimizer not in ("sgd", "lars"):
        raise ValueError(f"optimizer must be 'sgd' or 'lars', got {optimizer!r}")
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
    peak_lr = base_lr * batch_size / 256
    opt_class = torch.optim.SGD if optimizer == "sgd" else LARS
    opt = opt_class(head.parameters(), lr=peak_lr, momentum=momentum, weight_decay=weight_decay)

    settings = dict(epochs=epochs, batch_size=batch_size, base_lr=base_lr, optimizer=optimizer,
                    weight_decay=weight_decay, momentum=momentum, seed=seed, num_classes=num_classes,
                    feature_dim=feature_dim, standardize=standardize)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    start_epoch, stats = _resume(ckpt_path, head, opt, settings, fingerprint) if ckpt_path is not None else (0, None)
    if stats is None:
        stats = (feature_stats(backbone, train_dataset, feature_dim, seed, max(batch_size // world, 1), num_workers,
                               accelerator, dtype) if standardize
                 else (torch.zeros(feature_dim), torch.ones(feature_dim)))
    mean, inv_std = (t.to(device) for t in stats)
    if accelerator is not None:
        head, opt = accelerator.prepare(head, opt)

    # Shuffled from (seed, epoch), sharded by rank; padded with a few repeats so all ranks take the same steps.
    sampler = DistributedSampler(train_dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    loader = DataLoader(train_dataset, batch_size=batch_size // world, sampler=sampler, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    total = epochs * len(loader)
    train_loss = float("nan")
    with eval_mode(backbone), _frozen_params(backbone):
        for epoch in range(start_epoch, epochs):
            sampler.set_epoch(epoch)
            head.train()
            loss_sum = torch.zeros(2, device=device)  # (sum of batch losses * batch size, samples)
            bar = tqdm(loader, desc=f"linear probe {epoch + 1}/{epochs}", disable=not (progress and is_main),
                       dynamic_ncols=True)
            for i, (images, labels) in enumerate(bar):
                for group in opt.param_groups:
                    group["lr"] = peak_lr * cosine_factor(epoch * len(loader) + i, total)
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
                _save(ckpt_path, _unwrap(head, accelerator), opt, epoch + 1, settings, fingerprint, stats)
            if accelerator is not None:
                accelerator.wait_for_everyone()

    feats, labels = extract_features(backbone, test_dataset, batch_size=max(batch_size // world, 1),
                                     num_workers=num_workers, accelerator=accelerator, dtype=dtype,
                                     progress=progress, desc="linear probe test")
    check_backbone_unchanged(backbone, fingerprint)
    final = _unwrap(head, accelerator)
    with torch.no_grad():
        feats = (feats - stats[0]) * stats[1]  # the statistics live on the CPU, like the extracted features
        acc = topk_accuracy(F.linear(feats, final.weight.float().cpu(), final.bias.float().cpu()), labels)
    return {"top1": acc[1], "top5": acc[5], "lr": peak_lr, "epochs": epochs, "train_loss": train_loss}


def feature_stats(backbone: nn.Module, dataset, feature_dim: int, seed: int, batch_size: int, num_workers: int = 0,
                  accelerator: "accelerate.Accelerator | None" = None, dtype: torch.dtype | None = None,
                  max_images: int = STATS_IMAGES) -> tuple[Tensor, Tensor]:
    """(mean, 1 / sqrt(var + 1e-6)) per feature dimension over a seeded subset of `dataset`, on CPU.

    The subset's rows are shared out over the processes and gathered by `extract_features`, so every process
    gets the same statistics. The variance is the biased one, as BatchNorm normalises with.
    """
    count = min(len(dataset), max_images)
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    feats, _ = extract_features(backbone, Subset(dataset, indices.tolist()), batch_size=batch_size,
                                num_workers=num_workers, accelerator=accelerator, dtype=dtype, desc="probe statistics")
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


def _save(path: Path, head: nn.Module, opt, epochs_done: int, settings: dict, fingerprint: dict,
          stats: tuple[Tensor, Tensor]) -> None:
    """Write to a temporary name, then rename: an interrupted save never replaces the last good checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"head": head.state_dict(), "optimizer": opt.state_dict(), "epoch": epochs_done,
                "settings": settings, "backbone": fingerprint, "feature_mean": stats[0],
                "feature_inv_std": stats[1]}, tmp)
    os.replace(tmp, path)


def _resume(path: Path, head: nn.Module, opt, settings: dict,
            fingerprint: dict) -> tuple[int, tuple[Tensor, Tensor] | None]:
    """Load head and optimizer from `path` if it exists; return (epochs already done, its feature statistics)."""
    if not path.is_file():
        return 0, None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["settings"] != settings:
        diff = sorted(k for k in settings.keys() | state["settings"].keys()
                      if settings.get(k) != state["settings"].get(k))
        raise UserError(f"{path} was written with other probe settings ({', '.join(diff)}); "
                        "use another checkpoint directory or the same settings")
    if state["backbone"] != fingerprint:
        raise UserError(f"{path} was written for another backbone; use another checkpoint directory")
    head.load_state_dict(state["head"])
    opt.load_state_dict(state["optimizer"])
    return state["epoch"], (state["feature_mean"], state["feature_inv_std"])
