"""MoCo v3 (Chen, Xie & He, ICCV 2021).

loss = ctr(q1, k2) + ctr(q2, k1), ctr(q, k) = CE(q . all_gather(k)^T / tau, arange(N) + N * rank) * 2 tau, with
q, k l2-normalised; keys from the momentum encoder (EMA of backbone + projector), whose momentum follows
m = 1 - (1 - m0) (cos(pi t / T) + 1) / 2 per step.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from lightly.models.modules.heads import ProjectionHead
from lightly.models.utils import update_momentum
from lightly.utils.debug import std_of_l2_normalized
from torch import Tensor, nn

from batchssl.config import BatchFormerConfig, MethodConfig
from batchssl.distributed import all_gather_no_grad, rank
from batchssl.methods.base import SSLMethod, upcast


def mlp(in_dim: int, hidden: int, out: int, layers: int, last_bn: bool) -> ProjectionHead:
    """MoCo v3 heads: bias-free linear layers, BN + ReLU on hidden layers, BN without affine on the output when
    last_bn (always for the projector; for the predictor only with ViT, as the official code builds it)."""
    blocks = [(in_dim, hidden, nn.BatchNorm1d(hidden), nn.ReLU(), False)]
    blocks += [(hidden, hidden, nn.BatchNorm1d(hidden), nn.ReLU(), False) for _ in range(layers - 2)]
    blocks += [(hidden, out, nn.BatchNorm1d(out, affine=False) if last_bn else None, None, False)]
    return ProjectionHead(blocks)


def moco_momentum(step: int, total_steps: int, m0: float) -> float:
    return 1.0 - (1.0 - m0) * (math.cos(math.pi * step / max(total_steps, 1)) + 1.0) / 2.0


def contrastive_loss(q: Tensor, k: Tensor, temperature: float) -> Tensor:
    """InfoNCE of local queries against the keys of all processes; positives are this process's own keys."""
    q = F.normalize(upcast(q), dim=1)
    k = F.normalize(all_gather_no_grad(upcast(k)), dim=1)
    logits = q @ k.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank()
    return F.cross_entropy(logits, labels) * (2.0 * temperature)


class MoCoV3(SSLMethod):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: MethodConfig, batchformer: BatchFormerConfig):
        super().__init__(backbone, feature_dim, batchformer)
        self.temperature, self.m0 = cfg.temperature, cfg.momentum
        self.projector = mlp(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers, last_bn=True)
        self.predictor = mlp(cfg.proj_dim, cfg.proj_hidden_dim, cfg.proj_dim, 2, last_bn=cfg.pred_last_bn)
        # The momentum branch never has BatchFormer: keys stay the original ones.
        self.backbone_momentum = copy.deepcopy(backbone).requires_grad_(False)
        self.projector_momentum = copy.deepcopy(self.projector).requires_grad_(False)
        self._add_batchformer(cfg.proj_dim)

    def symmetric_loss(self, q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor) -> Tensor:
        return contrastive_loss(q1, k2, self.temperature) + contrastive_loss(q2, k1, self.temperature)

    def forward(self, views: list[Tensor], step: int = 0, total_steps: int = 1) -> dict[str, Tensor]:
        n = views[0].shape[0]
        m = moco_momentum(step, total_steps, self.m0)
        z1, z2 = self.project(views)
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            if self.training:
                update_momentum(self.backbone, self.backbone_momentum, m)
                update_momentum(self.projector, self.projector_momentum, m)
            k1, k2 = (self.projector_momentum(self.backbone_momentum(x)) for x in views)
        loss = self.symmetric_loss(q1[:n], q2[:n], k1, k2)
        out = {"loss_main": loss.detach()}
        if q1.shape[0] > n:
            loss_bf = self.symmetric_loss(q1[n:], q2[n:], k1, k2)
            loss = loss + self.bf_cfg.weight * loss_bf
            out["loss_bf"] = loss_bf.detach()
        with torch.no_grad():
            out["z_std"] = std_of_l2_normalized(upcast(z1[:n]))
        out["momentum"] = torch.tensor(m)
        out["loss"] = loss
        return out
