"""SimSiam (Chen & He, CVPR 2021): L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2, D = negative cosine similarity.

With local crops (augment.local_crops), every view's prediction faces the stop-gradient projections of the global
views but its own, averaged over the pairs (batchformer.cross_view_loss).
"""

from __future__ import annotations

from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules.heads import SimSiamPredictionHead
from torch import Tensor, nn

from batchssl.batchformer import cross_view_loss, two_stream_loss
from batchssl.config import BatchFormerConfig, MethodConfig
from batchssl.methods.base import SSLMethod, mlp, upcast
from batchssl.views import GLOBAL_VIEWS


class SimSiam(SSLMethod):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: MethodConfig, batchformer: BatchFormerConfig):
        super().__init__(backbone, feature_dim, batchformer)
        # lightly's SimSiamProjectionHead is fixed at 3 layers; the paper's CIFAR variant uses 2.
        self.projector = mlp(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers, last_bn=True)
        self.predictor = SimSiamPredictionHead(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)
        self.criterion = NegativeCosineSimilarity()
        self._add_batchformer(cfg.proj_dim)

    def negative_cosine(self, p: Tensor, z: Tensor) -> Tensor:
        return self.criterion(upcast(p), upcast(z.detach()))

    def loss(self, predictions: list[Tensor], projections: list[Tensor]) -> Tensor:
        """Mean of D(p_i, sg(z_j)) over the views i != j (z: the global views' projections)."""
        return cross_view_loss(self.negative_cosine, predictions, projections)

    def forward(self, views: list[Tensor], step: int = 0, total_steps: int = 1) -> dict[str, Tensor]:
        n = views[0].shape[0]
        z = self.project(views)
        # Targets are always the original stream's projector outputs of the global views, stop-gradient.
        out = two_stream_loss(
            self.loss, [self.predictor(x) for x in z], [x[:n] for x in z[:GLOBAL_VIEWS]], self.bf_cfg.weight
        )
        return {**out, "z_std": self.z_std(z[0][:n])}
