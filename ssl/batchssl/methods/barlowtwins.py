"""Barlow Twins (Zbontar et al., ICML 2021): the cross-correlation of the two views' batch-normalised projections
pulled towards the identity, sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2.

The statistics are those of the GLOBAL batch: both views are gathered with gradients before the batch norm and the
cross-correlation, so every process computes the one-process loss of the whole batch (the official code reaches
the same C with a synced batch norm and an all-reduce of C). With the identical loss on every process, the gathered
gradients (summed over processes) averaged by DDP are the one-process gradient (tests/test_methods.py checks it
under torchrun). The loss itself is lightly's BarlowTwinsLoss, applied to the gathered projections.

BatchFormer: the BatchFormer outputs form a second stream with the same loss, whose statistics are taken over
that stream's own batch. See docs/methods.md.
"""

from __future__ import annotations

from lightly.loss import BarlowTwinsLoss
from lightly.models.modules.heads import VICRegProjectionHead
from torch import Tensor, nn

from batchssl.config import BatchFormerConfig, MethodConfig
from batchssl.distributed import all_gather_grad
from batchssl.methods.base import upcast
from batchssl.methods.symmetric import SymmetricMethod


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambda_offdiag: float) -> Tensor:
    """The Barlow Twins loss of the global batch (every process gets the same value)."""
    # lightly's loss, one-process form, on the gathered batch: its own gather_distributed normalises each
    # process's batch separately and sums the C's, which is not the global batch's C.
    return BarlowTwinsLoss(lambda_param=lambda_offdiag)(all_gather_grad(upcast(z1)), all_gather_grad(upcast(z2)))


def expander(feature_dim: int, cfg: MethodConfig) -> nn.Module:
    """Barlow Twins' and VICReg's projector: proj_layers linear layers, BN + ReLU after all but the last."""
    return VICRegProjectionHead(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers)


class BarlowTwins(SymmetricMethod):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: MethodConfig, batchformer: BatchFormerConfig):
        super().__init__(backbone, feature_dim, batchformer)
        self.lambda_offdiag = cfg.barlow_lambda
        self.projector = expander(feature_dim, cfg)
        self._add_batchformer(cfg.proj_dim)

    def pair(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        return barlow_twins_loss(z_a, z_b, self.lambda_offdiag)
