"""Gradients of one training step in float64: one process on the whole batch (no WORLD_SIZE) writes them,
two processes (torchrun) on halves, with DDP through Accelerate and synced batch norm, compare to them.

usage: grads_2proc.py METHOD {gather|off} OUT_FILE   (BatchFormer over the global batch, or no BatchFormer)
"""

import os
import sys

import torch

from batchssl.backbones import build_backbone
from batchssl.config import BatchFormerConfig, MethodConfig, ModelConfig, OptimConfig
from batchssl.distributed import convert_sync_batchnorm, init_model_group
from batchssl.methods import METHODS
from batchssl.distributed import make_accelerator

method_name, batchformer, out_file = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(0)
backbone, dim = build_backbone(ModelConfig(arch="resnet18", width=0.125), in_channels=1, image_size=16)
cfg = MethodConfig(name=method_name, proj_hidden_dim=32, proj_dim=16, proj_layers=2, pred_hidden_dim=8,
                   temperature=0.2)
method = METHODS[method_name](backbone, dim, cfg, BatchFormerConfig(enabled=batchformer == "gather", gather=True, dropout=0.0))
method = method.double().train()
views = [torch.randn(16, 1, 16, 16, dtype=torch.float64) for _ in range(2)]

if "WORLD_SIZE" not in os.environ:
    method(views, 0, 10)["loss"].backward()
    torch.save({n: p.grad for n, p in method.named_parameters() if p.grad is not None}, out_file)
    sys.exit(0)

accelerator = make_accelerator()
rank = accelerator.process_index
init_model_group(accelerator.device)
method = convert_sync_batchnorm(method, accelerator.device)
optimizer = torch.optim.SGD(method.parameter_groups(OptimConfig()), lr=0.0)
model, optimizer = accelerator.prepare(method, optimizer)
# Contiguous halves: rank r holds samples 8r..8r+7 of each view, as a gathered batch lays them out.
accelerator.backward(model([v[8 * rank : 8 * (rank + 1)] for v in views], 0, 10)["loss"])
if rank == 0:
    expected = torch.load(out_file, weights_only=True)
    got = {n: p.grad for n, p in accelerator.unwrap_model(model).named_parameters() if p.grad is not None}
    assert sorted(got) == sorted(expected), set(got) ^ set(expected)
    worst = max(((got[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item() for n, g in expected.items())
    print(f"max relative gradient difference {worst:.3e} over {len(expected)} tensors")
    assert worst < 1e-9, worst
accelerator.wait_for_everyone()
accelerator.end_training()
