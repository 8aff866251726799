"""Linear probe on cached features: a grid of heads trained at once, the head chosen on held-out training data.

Features are extracted once (no augmentation). All heads of the grid (one per lr x weight decay) are one
(D, H, C) weight tensor, so a step is one matmul for the whole grid, and each head gets exactly the gradient of
its own mean cross-entropy. The head is chosen on a validation part of the TRAINING split; only that head is
scored on the test split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from batchssl.optim import warmup_cosine


@dataclass(frozen=True)
class CachedProbeSettings:
    lrs: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    weight_decays: tuple[float, ...] = (0.0,)
    epochs: int = 100
    batch_size: int = 1024
    momentum: float = 0.9
    val_fraction: float = 0.1  # part of the training split held out to choose the head
    seed: int = 0


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


@torch.no_grad()
def train_cached_probes(
    train_feats: Tensor,
    train_labels: Tensor,
    val_feats: Tensor,
    val_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    num_classes: int,
    settings: CachedProbeSettings = CachedProbeSettings(),
    device: torch.device | str | None = None,
    progress: bool = False,
    return_predictions: bool = False,
) -> dict:
    """Train one linear head per (lr, weight decay), pick the best on val top-1, score it on test.

    Features are standardised with the train part's per-dimension mean and variance (the BatchNorm without
    affine that MoCo v3 / MAE put before the head, with its statistics fixed since the features are fixed).
    All heads are one (D, H, C) weight tensor, so a step is a single matmul for the whole grid; each head gets
    exactly the gradient of its own mean cross-entropy. SGD with momentum and a per-step cosine schedule;
    weight decay on the weights, not the biases.

    Returns {"lr", "weight_decay", "val_top1", "test_top1", "test_top5", "grid": [{"lr", "weight_decay",
    "val_top1"}, ...]}. Ties on val go to the earlier grid entry (grid order: weight decay, then lr).
    With `return_predictions` the result also holds "test_predictions": the chosen head's top-1 class of every
    test row (int64, CPU), e.g. for batchssl.eval.per_class.per_class_report.
    """
    device = torch.device(device) if device is not None else train_feats.device
    mean, var = train_feats.mean(0), train_feats.var(0, unbiased=False)
    scale = torch.rsqrt(var + 1e-6)

    def prepare(feats: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return ((feats.float() - mean) * scale).to(device), labels.long().to(device)

    x, y = prepare(train_feats, train_labels)
    epochs, batch_size, momentum = settings.epochs, settings.batch_size, settings.momentum
    grid = [(lr, wd) for wd in settings.weight_decays for lr in settings.lrs]
    heads, dim = len(grid), x.shape[1]
    generator = torch.Generator().manual_seed(settings.seed)
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
            idx = order[i * batch_size : (i + 1) * batch_size]
            xb, yb = x[idx], y[idx]
            # One matmul for all heads: (B, D) @ (D, H * C). The gradient of each head's mean cross-entropy is
            # written out (softmax - onehot): three times faster than autograd at these tiny sizes.
            grad = (xb @ weight.view(dim, -1) + bias.view(-1)).view(len(idx), heads, num_classes).softmax(dim=2)
            grad[torch.arange(len(idx), device=device), :, yb] -= 1.0
            grad /= len(idx)
            grad_w = (xb.T @ grad.view(len(idx), -1)).view_as(weight)
            step_lr = lr * warmup_cosine(epoch * steps_per_epoch + i, total, 0, 1.0)
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
    test_logits = tx @ weight[:, best] + bias[best]
    test = topk_accuracy(test_logits, ty)
    extra = {"test_predictions": test_logits.argmax(dim=1).cpu()} if return_predictions else {}
    return {
        "lr": grid[best][0],
        "weight_decay": grid[best][1],
        "val_top1": val_top1[best].item(),
        "test_top1": test[1],
        "test_top5": test[5],
        "grid": [{"lr": lr_, "weight_decay": wd_, "val_top1": acc} for (lr_, wd_), acc in zip(grid, val_top1.tolist())],
        **extra,
    }


def _grid_top1(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, chunk: int = 4096) -> Tensor:
    """Top-1 (percent, on CPU) of every head; in chunks, as (rows, heads, classes) logits can be large."""
    correct = torch.zeros(weight.shape[1], dtype=torch.long, device=x.device)
    for start in range(0, len(x), chunk):
        logits = torch.einsum("nd,dhc->nhc", x[start : start + chunk], weight) + bias
        correct += (logits.argmax(dim=2) == y[start : start + chunk, None]).sum(dim=0)
    return 100.0 * correct.cpu().double() / len(x)
