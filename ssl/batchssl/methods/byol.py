"""BYOL (Grill et al., NeurIPS 2020): the online network (backbone, projector, predictor) predicts the target
network's projection of the other view; the target is an EMA of the online backbone + projector.

loss = l(p1, z2') + l(p2, z1') (local crops: see `BYOL.loss`), l(p, z) = mean over the batch of
||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z), the paper's symmetrised loss. The target's momentum follows
tau = 1 - (1 - tau0)(cos(pi t / T) + 1) / 2 per step, the paper's schedule, which is MoCo v3's (`moco_momentum`).
No statistic crosses the batch, so no gather: the mean over processes of the per-process losses is the global one.

BatchFormer: as for MoCo v3, both streams' predictions regress onto the same targets, the target network's
projections of the original images (the target network has no BatchFormer).
"""

from __future__ import annotations

import torch.nn.functional as F
from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead
from torch import Tensor, nn

from batchssl.batchformer import cross_view_loss
from batchssl.config import BatchFormerConfig, MethodConfig
from batchssl.methods.base import upcast
from batchssl.methods.momentum import MomentumTargetMethod


def byol_regression(p: Tensor, z: Tensor) -> Tensor:
    """Mean of 2 - 2 cos(p, z): the squared distance of the l2-normalised vectors; z is a target (no gradient)."""
    return (2 - 2 * F.cosine_similarity(upcast(p), upcast(z.detach()), dim=-1)).mean()


class BYOL(MomentumTargetMethod):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: MethodConfig, batchformer: BatchFormerConfig):
        super().__init__(backbone, feature_dim, batchformer)
        self.m0, self.m_final = cfg.momentum, cfg.momentum_final
        # Linear-BN-ReLU-Linear (the paper's 4096 -> 256 MLPs; hidden widths from the config)
        self.projector = BYOLProjectionHead(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.predictor = BYOLPredictionHead(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)
        self._add_momentum_branch()
        self._add_batchformer(cfg.proj_dim)

    @staticmethod
    def loss(predictions: list[Tensor], targets: list[Tensor]) -> Tensor:
        """l(p1, z2') + l(p2, z1') for two views; with local crops, 2 x the mean over prediction i, target j != i."""
        return len(targets) * cross_view_loss(byol_regression, predictions, targets)
