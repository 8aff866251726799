"""FLOPs of one training step, counted by torch.utils.flop_counter on the meta device (no memory, no time), and the
closed form of the BatchFormer layer's share that tests/test_benchmarks.py checks the count against."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from batchssl.backbones import build_backbone
from batchssl.config import Config
from batchssl.data import dataset_info
from batchssl.methods import build_method


def step_flops(cfg: Config, total_steps: int = 10_000) -> tuple[float, float | None]:
    """(FLOPs of one step's forward + backward, of which the BatchFormer layer's; None without BatchFormer).
    Matmuls, convolutions and attention only; element-wise ops and the optimizer update are not counted."""
    info = dataset_info(cfg.data)
    with torch.device("meta"):
        backbone, feature_dim = build_backbone(cfg.model, info.in_channels, info.image_size)
        method = build_method(cfg, backbone, feature_dim).train()
    shape = (cfg.train.batch_size, info.in_channels, info.image_size, info.image_size)
    views = [torch.empty(shape, device="meta") for _ in range(2)]
    counter = FlopCounterMode(display=False, depth=None)
    with counter:
        method(views, 1, total_steps)["loss"].backward()
    layer = [
        sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name.endswith(".batchformer.layer")
    ]
    return float(counter.get_total_flops()), (float(layer[0]) if layer else None)


def batchformer_flops_closed_form(cfg: Config, feature_dim: int) -> float:
    """Forward + backward (3 x forward) FLOPs of the BatchFormer layer from its shapes: per sequence of M tokens of
    width C with FFN width F (= C), 2 x [M C 3C (QKV) + M C C (out proj.) + 2 M^2 C (QK^T, AV) + 2 M C F (FFN)];
    scope joint is one sequence of 2N tokens, per_view two of N."""
    bf, n = cfg.batchformer, cfg.train.batch_size
    width = cfg.method.proj_dim if bf.position == "projector" else feature_dim
    ffn = width  # batchssl.batchformer: dim_feedforward = dim

    def layer_macs(tokens: int) -> int:
        return (
            tokens * width * 3 * width + tokens * width * width + 2 * tokens * tokens * width + 2 * tokens * width * ffn
        )

    macs = layer_macs(2 * n) if bf.scope == "joint" else 2 * layer_macs(n)
    return 3 * 2 * float(macs)
