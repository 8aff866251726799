"""The gathered losses and the new methods on two processes against one, in one launch.

usage: methods_2proc.py REFERENCE_FILE
- without WORLD_SIZE (one process, the whole batch): writes the references;
- under torchrun (two processes, each its contiguous half of the batch): compares with them, prints "ok <case>"
  per case on rank 0, and fails on the first mismatch.

Cases:
- loss/<name>/<precision>: SimCLR's NT-Xent, Barlow Twins, VICReg on z = linear(x) (autocast bf16 or fp32): the
  loss (mean over processes) and the linear layer's gradient (averaged over processes, as DDP does). fp32 must
  agree to 1e-5, bf16 (8 bits of mantissa, kernels chosen by batch size) to 3e-2.
- method/<name>: BYOL, SimCLR, Barlow Twins, VICReg, DINO in float64 with BatchFormer over the global batch,
  synced batch norm and DDP through Accelerate: the loss, every gradient and DINO's centre to 1e-8 (DINO reaches
  1.6e-9: its teacher temperature 0.04 amplifies rounding; a missing gather or sync is off by far more).
"""

import os
import sys

import torch
from torch import nn

from batchssl.config import BatchFormerConfig, MethodConfig, OptimConfig
from batchssl.methods import METHODS
from batchssl.methods.barlowtwins import barlow_twins_loss
from batchssl.methods.simclr import nt_xent
from batchssl.methods.vicreg import vicreg_loss

LOSSES = {
    "simclr": lambda a, b: nt_xent(a, b, 0.2),
    "barlowtwins": lambda a, b: barlow_twins_loss(a, b, 0.0051),
    "vicreg": lambda a, b: vicreg_loss(a, b, (25.0, 25.0, 1.0)),
}
PRECISIONS = {"fp32": (None, 1e-5), "bf16": (torch.bfloat16, 3e-2)}
METHOD_NAMES = ["byol", "simclr", "barlowtwins", "vicreg", "dino"]
N = 8  # global batch


def loss_case(name: str, precision: str, rows: slice):
    """(loss, gradient of the linear layer) on the given rows of a fixed global batch."""
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    x1, x2 = torch.randn(N, 6), torch.randn(N, 6)
    dtype = PRECISIONS[precision][0]
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = LOSSES[name](linear(x1[rows]), linear(x2[rows]))
    loss.backward()
    return loss.detach(), linear.weight.grad


def method_case(name: str):
    """A tiny float64 method with BatchFormer over the global batch (dropout 0) and its global batch of views."""
    torch.manual_seed(0)
    # no bias before the batch norm: its gradient would be 0 up to rounding
    backbone = nn.Sequential(
        nn.Conv2d(1, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    cfg = MethodConfig(
        name=name,
        proj_hidden_dim=16,
        proj_dim=16,
        proj_layers=2,
        pred_hidden_dim=8,
        dino_bottleneck_dim=8,
        temperature=0.2,
        dino_head_bn=True,
    )
    extra = {"epochs": 1} if name == "dino" else {}
    method = METHODS[name](backbone, 8, cfg, BatchFormerConfig(enabled=True, gather=True, dropout=0.0), **extra)
    views = [torch.randn(N, 1, 8, 8, dtype=torch.float64) for _ in range(2)]
    return method.double().train(), views


def grads(method) -> dict:
    return {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


def reference(out_file: str) -> None:
    ref = {}
    for name in LOSSES:
        for precision in PRECISIONS:
            ref[f"loss/{name}/{precision}"] = loss_case(name, precision, slice(None))
    for name in METHOD_NAMES:
        method, views = method_case(name)
        out = method(views, 0, 10)
        out["loss"].backward()
        ref[f"method/{name}"] = (out["loss"].detach(), grads(method), dict(method.named_buffers()).get("center"))
    torch.save(ref, out_file)


def relative(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    """Largest difference relative to the reference's largest entry, or to `floor` if that is smaller: a bias
    before a batch norm (in the loss: Barlow Twins, VICReg) has a zero gradient up to rounding."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(floor)).item()


def compare(out_file: str) -> None:
    import torch.distributed as dist

    from batchssl.distributed import convert_sync_batchnorm, init_model_group, make_accelerator

    accelerator = make_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    init_model_group(accelerator.device)
    ref = torch.load(out_file, weights_only=True)
    half = slice(rank * N // world, (rank + 1) * N // world)

    for name in LOSSES:
        for precision, (_, tolerance) in PRECISIONS.items():
            loss, grad = loss_case(name, precision, half)
            dist.all_reduce(loss), dist.all_reduce(grad)  # the mean over processes, as DDP averages gradients
            want_loss, want_grad = ref[f"loss/{name}/{precision}"]
            worst = max(relative(loss / world, want_loss), relative(grad / world, want_grad))
            assert worst < tolerance, f"loss/{name}/{precision}: relative difference {worst:.2e}"
            if rank == 0:
                print(f"ok loss/{name}/{precision} {worst:.1e}")

    for name in METHOD_NAMES:
        method, views = method_case(name)
        method = convert_sync_batchnorm(method, accelerator.device)
        optimizer = torch.optim.SGD(method.parameter_groups(OptimConfig()), lr=0.0)
        model, optimizer = accelerator.prepare(method, optimizer)
        out = model([v[half] for v in views], 0, 10)
        accelerator.backward(out["loss"])
        want_loss, want_grads, want_center = ref[f"method/{name}"]
        loss = out["loss"].detach().clone()
        dist.all_reduce(loss)
        got = grads(accelerator.unwrap_model(model))
        assert sorted(got) == sorted(want_grads), set(got) ^ set(want_grads)
        floor = 1e-6 * max(g.abs().max().item() for g in want_grads.values())
        worst = max([relative(loss / world, want_loss)] + [relative(got[k], g, floor) for k, g in want_grads.items()])
        if want_center is not None:
            worst = max(worst, relative(accelerator.unwrap_model(model).center, want_center))
        assert worst < 1e-8, f"method/{name}: relative difference {worst:.2e}"
        if rank == 0:
            print(f"ok method/{name} {worst:.1e} over {len(want_grads)} gradients")
        accelerator.free_memory()
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    (compare if "WORLD_SIZE" in os.environ else reference)(sys.argv[1])
