"""Process-group helpers that also work with no process group (one process) and on the CPU (gloo)."""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_gather as _all_gather_with_grad
from torch.distributed.nn.functional import all_reduce as _all_reduce_with_grad

# On gloo, collectives issued from inside backward (synced batch norm, BatchFormer's gather) on the default group
# race DDP's own asynchronous gradient all-reduces and get paired with the wrong tensors (wrong gradients or an
# abort). They get a process group of their own there; on NCCL the default group is right (torch's SyncBatchNorm
# does the same).
_model_group = None


@contextmanager
def _quiet_deprecation():
    """torch.distributed.nn.functional warns that it is deprecated; its autograd collectives (a backward that sums
    the gradients of every process) are exactly what synced statistics and gathered attention need, so keep them,
    quietly: only around our own calls (no process-wide filter)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\..* is deprecated")
        yield


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def make_accelerator(**kwargs):
    """An Accelerator that also forms a process group when torchrun starts several processes on a machine
    without GPUs (Accelerate only does so with cpu=True; with GPUs it picks NCCL by itself)."""
    from accelerate import Accelerator, InitProcessGroupKwargs

    from batchssl.launch import explain_join_failure, group_timeout

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if group_timeout() is not None:  # BATCHSSL_DIST_TIMEOUT_S: joining and every collective (batchssl.launch)
        handler = InitProcessGroupKwargs(timeout=group_timeout())
        kwargs["kwargs_handlers"] = [*kwargs.get("kwargs_handlers", []), handler]
    with explain_join_failure():
        return Accelerator(cpu=several and not torch.cuda.is_available(), **kwargs)


def init_model_group(device: torch.device) -> None:
    """Collective: every process calls it once, after the process group exists and before the model runs."""
    global _model_group
    if world_size() > 1 and device.type == "cpu" and _model_group is None:
        from batchssl.launch import group_timeout

        _model_group = dist.new_group(backend="gloo", timeout=group_timeout())  # None: torch's default


def _group():
    return _model_group if _model_group is not None else dist.group.WORLD


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    with _quiet_deprecation():
        return _all_reduce_with_grad(x, group=_group())


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenation of x over processes in rank order (no gradient: MoCo keys)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous(), group=_group())
    return torch.cat(parts)


def all_gather_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenation over processes in rank order; each process's slice receives the gradients of every
    process's loss (the backward sums them across processes, as DDP's averaging then expects)."""
    if world_size() == 1:
        return x
    with _quiet_deprecation():
        return torch.cat(_all_gather_with_grad(x.contiguous(), group=_group()))


class CrossProcessBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch for devices torch's SyncBatchNorm refuses (the CPU, with gloo).

    Two differentiable all-reduces (mean, then the centred second moment), so the statistics equal one process's
    on the concatenated batch up to float rounding, and gradients flow across processes as in torch's SyncBatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        # Statistics in float32 whatever the input's dtype (bf16 / fp16 under autocast), as torch's batch norm.
        dtype = x.dtype
        x = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        total = all_reduce_with_grad(count.detach())
        mean = all_reduce_with_grad(x.sum(dims)) / total
        centred = x - mean.view(shape)
        var = all_reduce_with_grad((centred * centred).sum(dims)) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                self.running_var.lerp_((var.detach() * total / (total - 1)).to(self.running_var.dtype), m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm -> torch's SyncBatchNorm on accelerators, CrossProcessBatchNorm on the CPU."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    converted = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CrossProcessBatchNorm):
        like = next(iter(module.state_dict().values()))  # keep the device and float dtype
        converted = CrossProcessBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            device=like.device,
            dtype=module.running_mean.dtype if module.track_running_stats else like.dtype,
        )
        if module.affine:
            with torch.no_grad():
                converted.weight.copy_(module.weight)
                converted.bias.copy_(module.bias)
            converted.weight.requires_grad_(module.weight.requires_grad)
            converted.bias.requires_grad_(module.bias.requires_grad)
        if module.track_running_stats:
            converted.running_mean.copy_(module.running_mean)
            converted.running_var.copy_(module.running_var)
            converted.num_batches_tracked.copy_(module.num_batches_tracked)
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, device))
    return converted
