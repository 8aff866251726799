"""MoCo v3 (Chen, Xie & He, ICCV 2021).

loss = ctr(q1, k2) + ctr(q2, k1), ctr(q, k) = CE(q . all_gather(k)^T / tau, arange(N) + N * rank) * 2 tau, with
q, k l2-normalised; keys from the momentum encoder (EMA of backbone + projector), whose momentum follows
m = 1 - (1 - m0) (cos(pi t / T) + 1) / 2 per step (the paper's; `method.momentum_final` moves the end from 1).
With local crops (augment.local_crops), keys come from the global views only and every view's query meets the
keys of the global views but its own: ctr averaged over those pairs, times 2 (the paper's two terms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from batchssl.batchformer import cross_view_loss
from batchssl.config import BatchFormerConfig, MethodConfig
from batchssl.distributed import all_gather_no_grad, rank
from batchssl.methods.base import mlp, upcast
from batchssl.methods.momentum import MomentumTargetMethod


def contrastive_loss(q: Tensor, k: Tensor, temperature: float) -> Tensor:
    """InfoNCE of local queries against the keys of all processes; positives are this process's own keys."""
    q = F.normalize(upcast(q), dim=1)
    k = F.normalize(all_gather_no_grad(upcast(k)), dim=1)
    logits = q @ k.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank()
    return F.cross_entropy(logits, labels) * (2.0 * temperature)


class MoCoV3(MomentumTargetMethod):
    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: MethodConfig, batchformer: BatchFormerConfig):
        super().__init__(backbone, feature_dim, batchformer)
        self.temperature, self.m0, self.m_final = cfg.temperature, cfg.momentum, cfg.momentum_final
        self.projector = mlp(feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers, last_bn=True)
        # The predictor's output BN only for ViT, as the official code builds it.
        self.predictor = mlp(cfg.proj_dim, cfg.proj_hidden_dim, cfg.proj_dim, 2, last_bn=cfg.pred_last_bn)
        # The momentum branch never has BatchFormer: keys stay the original ones.
        self._add_momentum_branch()
        self._add_batchformer(cfg.proj_dim)

    def loss(self, queries: list[Tensor], keys: list[Tensor]) -> Tensor:
        """ctr(q1, k2) + ctr(q2, k1) for two views; with more, 2 x the mean over query i, key j, i != j."""
        return len(keys) * cross_view_loss(lambda q, k: contrastive_loss(q, k, self.temperature), queries, keys)
