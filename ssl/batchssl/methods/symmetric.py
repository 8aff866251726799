"""What SimCLR, Barlow Twins and VICReg share: no predictor and no target branch, one loss over pairs of views.

BatchFormer: the BatchFormer outputs form a second stream with the same loss over that stream's own batch
(`two_stream_loss` with no targets). Their `_bf` recipes put BatchFormer on the backbone features, so that the
projector is the head both streams share (nothing follows the projector here); docs/methods.md says why.
"""

from __future__ import annotations

from torch import Tensor, nn

from batchssl.batchformer import two_stream_loss
from batchssl.config import BatchFormerConfig
from batchssl.methods.base import SSLMethod
from batchssl.views import GLOBAL_VIEWS


class SymmetricMethod(SSLMethod):
    """Subclasses set self.projector, define `pair(z_a, z_b)`, then call self._add_batchformer(dim)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, batchformer: BatchFormerConfig):
        super().__init__(backbone, feature_dim, batchformer)
        self.predictor = nn.Identity()

    def pair(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        raise NotImplementedError

    def loss(self, z: list[Tensor], _targets: list[Tensor]) -> Tensor:
        """pair(z1, z2) for two views; with local crops, the mean over every pair of a global view and another
        view (local crops are not paired with each other, as in multi-crop SwAV and DINO)."""
        pairs = [(i, j) for i in range(min(GLOBAL_VIEWS, len(z))) for j in range(i + 1, len(z))]
        return sum(self.pair(z[i], z[j]) for i, j in pairs) / len(pairs)

    def forward(self, views: list[Tensor], step: int = 0, total_steps: int = 1) -> dict[str, Tensor]:
        n = views[0].shape[0]
        z = self.project(views)
        out = two_stream_loss(self.loss, z, [], self.bf_cfg.weight, n=n)
        return {**out, "z_std": self.z_std(z[0][:n])}
