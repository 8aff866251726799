"""What SimSiam and MoCo v3 share: the online branch with the optional BatchFormer streams, parameter groups."""

from __future__ import annotations

import torch
from lightly.models.modules.heads import ProjectionHead
from lightly.utils.debug import std_of_l2_normalized
from torch import Tensor, nn

from batchssl.batchformer import BatchFormer, two_streams
from batchssl.config import BatchFormerConfig, OptimConfig


def upcast(x: Tensor) -> Tensor:
    """Losses in at least float32 under mixed precision (float64 stays float64, for exact tests)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def mlp(in_dim: int, hidden: int, out: int, layers: int, last_bn: bool) -> ProjectionHead:
    """The MoCo v3 / SimSiam head: bias-free linear layers, BN + ReLU after each hidden layer, and on the output
    a BN without affine when last_bn (both papers' projectors; MoCo v3's predictor only for ViT)."""
    blocks = [(in_dim, hidden, nn.BatchNorm1d(hidden), nn.ReLU(), False)]
    blocks += [(hidden, hidden, nn.BatchNorm1d(hidden), nn.ReLU(), False) for _ in range(layers - 2)]
    blocks += [(hidden, out, nn.BatchNorm1d(out, affine=False) if last_bn else None, None, False)]
    return ProjectionHead(blocks)


class SSLMethod(nn.Module):
    """Subclasses set self.projector and self.predictor, then call self._add_batchformer(projector output dim)."""

    projector: nn.Module
    predictor: nn.Module

    def __init__(self, backbone: nn.Module, feature_dim: int, batchformer: BatchFormerConfig):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.bf_cfg = batchformer
        self.batchformer: BatchFormer | None = None

    def _add_batchformer(self, proj_dim: int) -> None:
        if self.bf_cfg.enabled:
            dim = proj_dim if self.bf_cfg.position == "projector" else self.feature_dim
            self.batchformer = BatchFormer(dim, self.bf_cfg)

    def _bf_at(self, position: str) -> BatchFormer | None:
        return self.batchformer if self.bf_cfg.position == position else None

    def project(self, views: list[Tensor]) -> list[Tensor]:
        """Online projector outputs per view (any number: views[:views.GLOBAL_VIEWS] the global crops, then the
        local ones). In training with BatchFormer each holds 2n rows: [:n] the original stream, [n:] the
        BatchFormer stream."""
        h = two_streams(self._bf_at("backbone"), [self.backbone(x) for x in views])
        return two_streams(self._bf_at("projector"), [self.projector(x) for x in h])

    @staticmethod
    @torch.no_grad()
    def z_std(z: Tensor) -> Tensor:
        """Std of the l2-normalised projections: 0 at collapse, about 1 / sqrt(dim) when healthy (SimSiam)."""
        return std_of_l2_normalized(upcast(z))

    def trainable_parts(self) -> dict[str, nn.Module]:
        """Named parts whose parameters the optimizer updates (momentum encoders excluded)."""
        parts = {"backbone": self.backbone, "projector": self.projector, "predictor": self.predictor}
        if self.batchformer is not None:
            parts["batchformer"] = self.batchformer
        return parts

    def parameter_groups(self, cfg: OptimConfig) -> list[dict]:
        """Per part, two groups: weights with weight decay, and norms/biases (ndim <= 1) without it (and at
        optim.bias_lr_ratio times the lr: Barlow Twins).

        The group keys `lr_scale` (BatchFormer's, times bias_lr_ratio), `fixed_lr` (SimSiam's predictor option) and
        `decays` (for optim.weight_decay_end) are defined in batchssl.optim. LARS gives groups with weight_decay 0
        no trust ratio: the MoCo v3 / BYOL exclusion of biases and norms from adaptation.
        """
        groups = []
        for name, part in self.trainable_parts().items():
            params = [p for p in part.parameters() if p.requires_grad]
            lr_scale = self.bf_cfg.lr_scale if name == "batchformer" else 1.0
            fixed = cfg.fixed_predictor_lr and name == "predictor"
            weights, others = [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]
            for decays, members in ((True, weights), (False, others)):
                if members:
                    groups.append(
                        {
                            "params": members,
                            "weight_decay": cfg.weight_decay if decays else 0.0,
                            "decays": decays,
                            "lr_scale": lr_scale * (1.0 if decays else cfg.bias_lr_ratio),
                            "fixed_lr": fixed,
                            "name": f"{name}{'' if decays else '_no_decay'}",
                        }
                    )
        return groups
