"""Gradients of one training step in float64: two processes (torchrun) on halves of the batch, with DDP through
Accelerate and synced batch norm, compare theirs to one process's on the whole batch.

`one_process_grads()` is also imported by tests/test_distributed.py, which writes the references in its own process.
usage: grads_2proc.py REFERENCE_DIR METHOD:{gather|off} [...]   (BatchFormer over the global batch, or none)
Every case runs in the same launch (one torchrun start for all); rank 0 prints one line per case,
`CASE max relative gradient difference D over N tensors, keys equal: True|False`, and the test judges them.
"""

import sys

import torch

from batchssl.backbones import build_backbone
from batchssl.config import BatchFormerConfig, MethodConfig, ModelConfig, OptimConfig
from batchssl.distributed import convert_sync_batchnorm, init_model_group, make_accelerator
from batchssl.methods import METHODS


def build(method_name: str, batchformer: str) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """The seeded float64 model in train mode, and the two views of its 16-image batch."""
    torch.manual_seed(0)
    backbone, dim = build_backbone(ModelConfig(arch="resnet18", width=0.125), in_channels=1, image_size=16)
    cfg = MethodConfig(
        name=method_name, proj_hidden_dim=32, proj_dim=16, proj_layers=2, pred_hidden_dim=8, temperature=0.2
    )
    bf = BatchFormerConfig(enabled=batchformer == "gather", gather=True, dropout=0.0)
    method = METHODS[method_name](backbone, dim, cfg, bf).double().train()
    views = [torch.randn(16, 1, 16, 16, dtype=torch.float64) for _ in range(2)]
    return method, views


def one_process_grads(method_name: str, batchformer: str) -> dict[str, torch.Tensor]:
    method, views = build(method_name, batchformer)
    method(views, 0, 10)["loss"].backward()
    return {n: p.grad for n, p in method.named_parameters() if p.grad is not None}


def compare(accelerator, method_name: str, batchformer: str, reference_file: str) -> None:
    method, views = build(method_name, batchformer)
    rank = accelerator.process_index
    method = convert_sync_batchnorm(method, accelerator.device)
    optimizer = torch.optim.SGD(method.parameter_groups(OptimConfig()), lr=0.0)
    model, optimizer = accelerator.prepare(method, optimizer)
    # Contiguous halves: rank r holds samples 8r..8r+7 of each view, as a gathered batch lays them out.
    accelerator.backward(model([v[8 * rank : 8 * (rank + 1)] for v in views], 0, 10)["loss"])
    if rank == 0:
        expected = torch.load(reference_file, weights_only=True)
        got = {n: p.grad for n, p in accelerator.unwrap_model(model).named_parameters() if p.grad is not None}
        same = sorted(got) == sorted(expected)
        worst = max(
            ((got[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item() for n, g in expected.items() if n in got
        )
        print(
            f"{method_name}:{batchformer} max relative gradient difference {worst:.3e} over {len(expected)} "
            f"tensors, keys equal: {same}",
            flush=True,
        )
    accelerator.wait_for_everyone()


def main(reference_dir: str, cases: list[str]) -> None:
    accelerator = make_accelerator()
    init_model_group(accelerator.device)
    for case in cases:
        method_name, batchformer = case.split(":")
        compare(accelerator, method_name, batchformer, f"{reference_dir}/{method_name}_{batchformer}.pt")
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
