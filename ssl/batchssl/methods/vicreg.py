"""VICReg (Bardes, Ponce & LeCun, ICLR 2022): lambda * invariance (MSE between the views' projections)
+ mu * variance (hinge on each dimension's std, per view) + nu * covariance (squared off-diagonal covariances).

As in the official code, the invariance term is each process's mean over its own pairs (their mean over processes
is the global mean), while the variance and covariance are statistics of the GLOBAL batch, gathered with gradients
first (FullGatherLayer there, all_gather_grad here). DDP's averaging then gives the one-process gradient
(tests/test_methods.py checks it under torchrun). The invariance and variance terms are lightly's functions; the
covariance term is lightly's value without its boolean mask of the off-diagonal (at the papers' 8192 dimensions that
mask costs a 67M-element index and a 256 MB copy per view; the sum of all squares minus the diagonal's is the same).

BatchFormer: the BatchFormer outputs form a second stream with the same loss over that stream's own batch. See
docs/methods.md.
"""

from __future__ import annotations

from lightly.loss.vicreg_loss import invariance_loss, variance_loss
from torch import Tensor, nn

from batchssl.config import BatchFormerConfig, MethodConfig
from batchssl.distributed import all_gather_grad
from batchssl.methods.barlowtwins import expander
from batchssl.methods.base import upcast
from batchssl.methods.symmetric import SymmetricMethod


def covariance_loss(z: Tensor) -> Tensor:
    """The sum of the squared off-diagonal entries of z's covariance (unbiased), over the dimension."""
    z = z - z.mean(dim=0)
    cov = z.T @ z / (z.shape[0] - 1)
    return (cov.square().sum() - cov.diagonal().square().sum()) / z.shape[1]


def vicreg_loss(z1: Tensor, z2: Tensor, weights: tuple[float, float, float] = (25.0, 25.0, 1.0)) -> Tensor:
    """weights = (invariance lambda, variance mu, covariance nu), the paper's 25, 25, 1 by default."""
    z1, z2 = upcast(z1), upcast(z2)
    invariance = invariance_loss(z1, z2)
    g1, g2 = all_gather_grad(z1), all_gather_grad(z2)
    variance = 0.5 * (variance_loss(g1) + variance_loss(g2))
    covariance = covariance_loss(g1) + covariance_loss(g2)
    return weights[0] * invariance + weights[1] * variance + weights[2] * covariance


class VICReg(SymmetricMethod):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: MethodConfig, batchformer: BatchFormerConfig):
        super().__init__(backbone, feature_dim, batchformer)
        self.weights = cfg.vicreg_weights
        self.projector = expander(feature_dim, cfg)
        self._add_batchformer(cfg.proj_dim)

    def pair(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        return vicreg_loss(z_a, z_b, self.weights)
