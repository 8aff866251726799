"""What MoCo v3 and BYOL share: a momentum (EMA) copy of backbone + projector that makes the targets, and its
schedule. A subclass builds its projector and predictor, calls `_add_momentum_branch()`, and defines
`loss(predictions, targets)` over the view lists; `forward` is the same for both methods.
"""

from __future__ import annotations

import copy

import torch
from lightly.models.utils import update_momentum
from torch import Tensor

from batchssl.batchformer import two_stream_loss
from batchssl.methods.base import SSLMethod
from batchssl.optim import warmup_cosine
from batchssl.views import GLOBAL_VIEWS


def moco_momentum(step: int, total_steps: int, m0: float, final: float = 1.0) -> float:
    """m0 at step 0, a half cosine up to `final` (the papers' 1) at the last step."""
    return warmup_cosine(step, total_steps, 0, m0, end=final)


class MomentumTargetMethod(SSLMethod):
    """Targets from an EMA of backbone + projector (never with BatchFormer: targets stay the original ones)."""

    m0: float
    m_final: float

    def _add_momentum_branch(self) -> None:
        self.backbone_momentum = copy.deepcopy(self.backbone).requires_grad_(False)
        self.projector_momentum = copy.deepcopy(self.projector).requires_grad_(False)

    def loss(self, predictions: list[Tensor], targets: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def forward(self, views: list[Tensor], step: int = 0, total_steps: int = 1) -> dict[str, Tensor]:
        n = views[0].shape[0]
        m = moco_momentum(step, total_steps, self.m0, self.m_final)
        z = self.project(views)
        with torch.no_grad():
            if self.training:
                update_momentum(self.backbone, self.backbone_momentum, m)
                update_momentum(self.projector, self.projector_momentum, m)
            targets = [self.projector_momentum(self.backbone_momentum(x)) for x in views[:GLOBAL_VIEWS]]
        out = two_stream_loss(self.loss, [self.predictor(x) for x in z], targets, self.bf_cfg.weight)
        return {**out, "z_std": self.z_std(z[0][:n]), "momentum": torch.tensor(m)}
