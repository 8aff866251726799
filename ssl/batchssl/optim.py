"""Optimisers and schedules: the factory the trainer uses, one LARS, one warmup + cosine schedule.

Parameter groups (built by a method's `parameter_groups`, or by hand) may carry three keys besides torch's own,
read every step:
- `lr_scale` (float, default 1): the group's lr is the scheduled lr times this (BatchFormer's `lr_scale`,
  Barlow Twins' lr of biases and norms);
- `fixed_lr` (bool, default False): the group keeps the peak lr, no warmup or decay (SimSiam's predictor option).
- `decays` (bool, default False): a weight-decay schedule (`optim.weight_decay_end`, DINO's) sets this group's
  decay (`apply_weight_decay`).
"""

from __future__ import annotations

import math

import torch

from batchssl.config import Config, OptimConfig


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, start: float, end: float = 0.0) -> float:
    """Linear warmup from 0 to `start` over `warmup_steps`, then a half cosine from `start` to `end`.

    The trainer's lr (start = peak lr, end = 0: MoCo v3, SimSiam), the probes' lr (no warmup) and MoCo v3's
    momentum (start = m0, end = 1: m = 1 - (1 - m0)(cos(pi t / T) + 1) / 2) are all this one function.
    """
    if step < warmup_steps:
        return start * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def peak_lr(cfg: Config) -> float:
    """The linear scaling rule of MoCo v3 and SimSiam: lr = base_lr * global batch / 256."""
    return cfg.optim.base_lr * cfg.train.batch_size / 256


def scheduled_lr(cfg: Config, step: int, total_steps: int, warmup_steps: int) -> float:
    """The trainer's lr at `step`: warmup to the peak, then a half cosine to peak x optim.final_lr_ratio."""
    peak = peak_lr(cfg)
    return warmup_cosine(step, total_steps, warmup_steps, peak, end=peak * cfg.optim.final_lr_ratio)


def apply_lr(optimizer: torch.optim.Optimizer, lr: float, peak: float) -> None:
    """Set every group's lr from the scheduled `lr`, honouring the group keys `lr_scale` and `fixed_lr`."""
    for group in optimizer.param_groups:
        group["lr"] = (peak if group.get("fixed_lr") else lr) * group.get("lr_scale", 1.0)


def scheduled_weight_decay(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """DINO's weight-decay schedule: a half cosine from weight_decay at step 0 to weight_decay_end at the last
    step, no warmup (constant weight_decay when weight_decay_end is null)."""
    if cfg.weight_decay_end is None:
        return cfg.weight_decay
    return warmup_cosine(step, total_steps, 0, cfg.weight_decay, end=cfg.weight_decay_end)


def apply_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """Set the decay of the groups marked `decays` (a method's weights); biases and norms keep none."""
    for group in optimizer.param_groups:
        if group.get("decays", False):
            group["weight_decay"] = weight_decay


def clip_gradients(accelerator, parameters, max_norm: float, mode: str) -> None:
    """train.max_grad_norm: the global norm (torch's clip through Accelerate) or each tensor's own (DINO's);
    under fp16 the loss scale comes off the gradients first, as Accelerate's clip does."""
    if mode == "per_tensor":
        accelerator.unscale_gradients()
        clip_grad_norm_per_tensor_(parameters, max_norm)
    else:
        accelerator.clip_grad_norm_(parameters, max_norm)


@torch.no_grad()
def clip_grad_norm_per_tensor_(parameters, max_norm: float, eps: float = 1e-6) -> None:
    """DINO's clipping: each gradient scaled by min(1, max_norm / (|g| + eps)) on its own, not by the global norm
    (keeps one large layer from shrinking every other layer's update). No host synchronisation."""
    for p in parameters:
        if p.grad is not None:
            p.grad.mul_((max_norm / (torch.linalg.vector_norm(p.grad) + eps)).clamp(max=1.0))


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al. 2017), as MoCo v3, BYOL and SimSiam use it.

    For a weight matrix (ndim > 1) the update g + wd * p is scaled by
    trust_coefficient * |p| / (|g| + wd * |p| + eps) (1 when |p| or |g| is 0). Groups with weight decay 0 get
    no trust ratio (MoCo v3 / BYOL exclude biases and norms from adaptation that way) unless they set
    `trust_without_decay` -- SimSiam's linear probe trains with LARS at weight decay 0, where skipping the trust
    ratio would silently make it plain SGD. Equal to lightly's LARS for groups with decay, but free of host
    synchronisation (no `if norm != 0` on device tensors).
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        trust_without_decay: bool = False,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("LARS: lr, momentum and weight_decay must be >= 0")
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                trust_coefficient=trust_coefficient,
                eps=eps,
                trust_without_decay=trust_without_decay,
            ),
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd = group["weight_decay"]
            adapt = wd != 0 or group["trust_without_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if adapt and p.ndim > 1:
                    p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                    trust = group["trust_coefficient"] * p_norm / (g_norm + p_norm * wd + group["eps"])
                    trust = torch.where((p_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))
                    update = update.add(p, alpha=wd) * trust
                state = self.state[p]
                if group["momentum"] != 0:
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = update.clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                    update = state["momentum_buffer"]
                p.add_(update, alpha=-group["lr"])
        return loss


def build_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD, LARS or AdamW over `groups` (each with its own weight_decay). The lr is set by `apply_lr` before
    every step, so the 0 given here is never used."""
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum)
    if cfg.name == "lars":
        return LARS(groups, lr=0.0, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=0.0, betas=cfg.betas)
