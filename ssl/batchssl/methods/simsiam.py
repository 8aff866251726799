"""SimSiam (Chen & He, CVPR 2021): L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2, D = negative cosine similarity."""

from __future__ import annotations

from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules.heads import SimSiamPredictionHead
from torch import Tensor, nn

from batchssl.batchformer import two_stream_loss
from batchssl.config import BatchFormerConfig, MethodConfig
from batchssl.methods.base import SSLMethod, mlp, upcast


class SimSiam(SSLMethod):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: MethodConfig, batchformer: BatchFormerConfig):
        super().__init__(backbone, feature_dim, batchformer)
        # lightly's SimSiamProjectionHead is fixed at 3 layers; the paper's CIFAR variant uses 2.
        self.projector = mlp(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers, last_bn=True)
        self.predictor = SimSiamPredictionHead(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)
        self.criterion = NegativeCosineSimilarity()
        self._add_batchformer(cfg.proj_dim)

    def symmetric_loss(self, p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
        return 0.5 * (self.criterion(upcast(p1), upcast(z2.detach())) + self.criterion(upcast(p2), upcast(z1.detach())))

    def forward(self, views: list[Tensor], step: int = 0, total_steps: int = 1) -> dict[str, Tensor]:
        n = views[0].shape[0]
        z1, z2 = self.project(views)
        # Targets are always the original stream's projector outputs, stop-gradient.
        out = two_stream_loss(self.symmetric_loss, (self.predictor(z1), self.predictor(z2)), (z1[:n], z2[:n]),
                              self.bf_cfg.weight)
        return {**out, "z_std": self.z_std(z1[:n])}
