"""SimSiam (Chen & He, CVPR 2021): L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2, D = negative cosine similarity."""

from __future__ import annotations

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules.heads import ProjectionHead, SimSiamPredictionHead
from lightly.utils.debug import std_of_l2_normalized
from torch import Tensor, nn

from batchssl.config import BatchFormerConfig, MethodConfig
from batchssl.methods.base import SSLMethod, upcast


def simsiam_projector(in_dim: int, hidden: int, out: int, layers: int) -> ProjectionHead:
    """lightly's SimSiamProjectionHead is fixed at 3 layers; the CIFAR variant of the paper uses 2.
    Every layer has BN, the last without affine and without ReLU."""
    blocks = [(in_dim, hidden, nn.BatchNorm1d(hidden), nn.ReLU())]
    blocks += [(hidden, hidden, nn.BatchNorm1d(hidden), nn.ReLU()) for _ in range(layers - 2)]
    blocks += [(hidden, out, nn.BatchNorm1d(out, affine=False), None)]
    return ProjectionHead(blocks)


class SimSiam(SSLMethod):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: MethodConfig, batchformer: BatchFormerConfig):
        super().__init__(backbone, feature_dim, batchformer)
        self.projector = simsiam_projector(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers)
        self.predictor = SimSiamPredictionHead(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)
        self.criterion = NegativeCosineSimilarity()
        self._add_batchformer(cfg.proj_dim)

    def symmetric_loss(self, p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
        return 0.5 * (self.criterion(upcast(p1), upcast(z2.detach())) + self.criterion(upcast(p2), upcast(z1.detach())))

    def forward(self, views: list[Tensor], step: int = 0, total_steps: int = 1) -> dict[str, Tensor]:
        n = views[0].shape[0]
        z1, z2 = self.project(views)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        # Targets are always the original stream's projector outputs, stop-gradient.
        loss = self.symmetric_loss(p1[:n], p2[:n], z1[:n], z2[:n])
        out = {"loss_main": loss.detach()}
        if z1.shape[0] > n:
            loss_bf = self.symmetric_loss(p1[n:], p2[n:], z1[:n], z2[:n])
            loss = loss + self.bf_cfg.weight * loss_bf
            out["loss_bf"] = loss_bf.detach()
        with torch.no_grad():
            out["z_std"] = std_of_l2_normalized(upcast(z1[:n]))
        out["loss"] = loss
        return out
