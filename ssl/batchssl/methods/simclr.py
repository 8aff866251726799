"""SimCLR (Chen et al., ICML 2020): NT-Xent over the two views, every other image of the GLOBAL batch a negative.

Each process scores its own 2n projections (both views) against the 2N projections of all processes, gathered
with gradients; the positive of view 1 of local sample i is view 2 of global sample n * rank + i, and each
projection's similarity with itself is masked out. The mean over processes of the per-process losses is then
the one-process loss on the global batch, and DDP's averaging of the gathered gradients gives its gradient
(tests/test_methods.py checks both under torchrun). Equal to lightly's NTXentLoss on one process.

BatchFormer: the BatchFormer outputs form a second stream with the same loss over its own 2N projections (a
sample's original and attended projections are never each other's negatives). See docs/methods.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.models.modules.heads import SimCLRProjectionHead
from torch import Tensor, nn

from batchssl.config import BatchFormerConfig, MethodConfig
from batchssl.distributed import all_gather_grad, rank
from batchssl.methods.base import upcast
from batchssl.methods.symmetric import SymmetricMethod


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's loss of this process's n pairs against the negatives of every process."""
    z1, z2 = F.normalize(upcast(z1), dim=1), F.normalize(upcast(z2), dim=1)
    n = z1.shape[0]
    anchors = torch.cat([z1, z2])  # 2n local rows
    g1, g2 = all_gather_grad(z1), all_gather_grad(z2)
    big_n = g1.shape[0]
    logits = anchors @ torch.cat([g1, g2]).T / temperature  # (2n, 2N): columns [all views 1; all views 2]
    own = torch.arange(n, device=z1.device) + n * rank()  # this process's samples in the global batch
    self_col = torch.cat([own, own + big_n])
    positive = torch.cat([own + big_n, own])
    logits = logits.masked_fill(F.one_hot(self_col, 2 * big_n).bool(), float("-inf"))
    return F.cross_entropy(logits, positive)


class SimCLR(SymmetricMethod):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: MethodConfig, batchformer: BatchFormerConfig):
        super().__init__(backbone, feature_dim, batchformer)
        self.temperature = cfg.temperature
        # lightly's head: proj_layers linear layers, each followed by BN (ReLU but on the output): SimCLR v1's
        # 2-layer head with SimCLR v2's batch norms, v2's deeper head with proj_layers: 3
        self.projector = SimCLRProjectionHead(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers)
        self._add_batchformer(cfg.proj_dim)

    def pair(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        return nt_xent(z_a, z_b, self.temperature)
