"""Online linear probe: a linear classifier trained alongside pretraining on detached backbone features, as
solo-learn's online classifier and lightly's OnlineLinearClassifier, so a run shows a linear-accuracy curve
without waiting for `python -m linear_probe`.

- It reads the backbone features of the training views, detached: no gradient ever reaches the backbone, so
  pretraining is unchanged by it.
- Features are standardised by a non-affine BatchNorm1d (running statistics, used at evaluation) in front of the
  nn.Linear, as MAE's linear-probe head and solo-learn do: the backbone's feature scale drifts a lot during
  pretraining, and standardisation makes one fixed lr right for every backbone and every moment of the run.
- It has its own optimiser (SGD, momentum 0.9, no weight decay) and its own cosine schedule (no warmup, to 0 at
  the last pretraining step, batchssl.optim.warmup_cosine), stepped inside `train_step`.
- lr = 0.1: solo-learn's classifier lr (its CIFAR / ImageNet-100 recipes) and MAE's linear-probe base lr. With
  standardised inputs the logits' gradient has unit scale whatever the backbone, so 0.1 with momentum 0.9 is
  stable from the first step (the tests train a separable toy problem to > 95 % in 200 steps) and needs no
  scaling with the batch size (the loss is a batch mean).
- Rows labelled -1 (STL-10's unlabelled split) are skipped, for the statistics as for the loss.
- It draws no random number from torch's global generator: the weights come from a torch.Generator of its own
  (seeded at construction), so the SSL losses of a run are identical with the probe on and off.

Several processes: every process must end with the same probe. The trainer should all-gather the features and
labels of the step (`gather_rows`, no gradient) and call `train_step` with the global rows on every process;
the copies then stay bit-equal (same seed, same rows, same order). Calling it with each process's local rows also
works, but then each process keeps its own probe trained on its own shard (checkpoint only rank 0's then).

Checkpointing: `state_dict()` includes the optimiser's state (momentum buffers) as the module's extra state, so
`load_state_dict(state_dict())` -- or Accelerate's `register_for_checkpointing(probe)` -- resumes exactly. The
state is plain tensors, numbers and lists: it loads with torch.load(weights_only=True).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from batchssl.optim import warmup_cosine


class OnlineLinear(nn.Module):
    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        seed: int = 0,
        init_std: float = 0.01,
        skip_unlabelled: bool = True,
    ):
        super().__init__()
        if feature_dim < 1 or num_classes < 2:
            raise ValueError(f"OnlineLinear: feature_dim >= 1 and num_classes >= 2, got {feature_dim}, {num_classes}")
        self.feature_dim, self.num_classes, self.lr = feature_dim, num_classes, lr
        # False when every training row is labelled: no row selection then, hence no host-device sync per step.
        self.skip_unlabelled = skip_unlabelled
        self.norm = nn.BatchNorm1d(feature_dim, affine=False)
        # skip_init: nn.Linear's own reset_parameters would draw from torch's global generator.
        self.linear = nn.utils.skip_init(nn.Linear, feature_dim, num_classes)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # MAE's probe head init: N(0, 0.01^2) weights, zero bias
            self.linear.weight.copy_(torch.randn(num_classes, feature_dim, generator=generator) * init_std)
            self.linear.bias.zero_()
        self.optimizer = torch.optim.SGD(self.linear.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    def forward(self, features: Tensor) -> Tensor:
        """Logits (float32) of detached features."""
        x = features.detach().to(self.linear.weight.device, torch.float32)
        return self.linear(self.norm(x))

    def train_step(self, features: Tensor, labels: Tensor, step: int, total_steps: int) -> Tensor | None:
        """One SGD step on the labelled rows (label >= 0) at the scheduled lr; returns the loss (detached), or
        None when the batch has no labelled row (then nothing changes)."""
        device = self.linear.weight.device
        labels = labels.to(device)
        x, y = features.detach().to(device, torch.float32), labels.long()
        if self.skip_unlabelled:
            keep = labels >= 0
            if not bool(keep.any()):
                return None
            x, y = x[keep], y[keep]
        lr = warmup_cosine(step, total_steps, 0, self.lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Its own precision: float32 even when the trainer runs under autocast.
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            self.train()
            if len(y) == 1:  # batch statistics of one row are undefined: use the running ones
                self.norm.eval()
            loss = F.cross_entropy(self.linear(self.norm(x)), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def evaluate(self, features: Tensor, labels: Tensor) -> dict[str, float]:
        """{"online_top1", "online_top5"} in percent on the given (validation) features, in eval mode (running
        statistics); rows labelled -1 are ignored. With fewer than 5 classes top-5 is top-C (100 %)."""
        was_training = self.training
        self.eval()
        try:
            device = self.linear.weight.device
            labels = labels.to(device)
            keep = labels >= 0
            x, y = features[keep.to(features.device)], labels[keep].long()
            if len(y) == 0:
                raise ValueError("OnlineLinear.evaluate: no labelled row")
            with torch.autocast(device.type, enabled=False):
                logits = torch.cat([self(x[i : i + 8192]) for i in range(0, len(x), 8192)])
            top = logits.topk(min(5, self.num_classes), dim=1).indices
            hits = top == y[:, None]
            return {
                "online_top1": 100.0 * hits[:, 0].float().mean().item(),
                "online_top5": 100.0 * hits.any(1).float().mean().item(),
            }
        finally:
            self.train(was_training)

    # The optimiser's state travels in the module's state_dict as its extra state.
    def get_extra_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


def gather_rows(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The step's features and labels of every process, concatenated in rank order, on every process (no
    gradient). Every process must pass the same number of rows (the trainer's equal local batches). One process:
    returned as they are (detached)."""
    from batchssl.distributed import all_gather_no_grad

    labels = labels.to(features.device).long()
    return all_gather_no_grad(features.detach()), all_gather_no_grad(labels)


@contextmanager
def feature_tap(backbone: nn.Module) -> Iterator[list[Tensor]]:
    """Collect the backbone's outputs (detached, flattened to one row per image) of every forward inside the
    block, in call order, without touching the method's code or its autograd graph:

        with feature_tap(inner.backbone) as taps:
            metrics = train_step(method, ...)
        features = torch.cat(taps)          # (2N, D): view 1's rows, then view 2's
        labels = torch.cat([labels] * len(views))

    MoCo v3's momentum backbone is a separate module, so only the online backbone's outputs are collected."""
    taps: list[Tensor] = []

    def hook(module, inputs, output):
        taps.append(output.detach().flatten(1))

    handle = backbone.register_forward_hook(hook)
    try:
        yield taps
    finally:
        handle.remove()
