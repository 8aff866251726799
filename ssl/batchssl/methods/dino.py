"""DINO (Caron et al., ICCV 2021): self-distillation with no labels. The student (backbone + head) matches the
teacher's centred, sharpened distribution over K prototypes for the OTHER view:

loss = mean over pairs (t, s), s != t, of H(P_t, P_s), P_t = softmax((g_t - c) / T_teacher),
log P_s = log_softmax(g_s / T_student),

with the teacher an EMA of the student (momentum 0.996 -> 1 by the same half cosine as MoCo v3 and BYOL), the
centre c an EMA (center_momentum) of the teacher's mean output over the GLOBAL batch (an all-reduce of its sum, as
the official code does), and the teacher temperature warmed up linearly from teacher_temp_start to teacher_temp.
The head is the paper's: an MLP (GELU) to a bottleneck, l2 normalisation, a weight-normalised bias-free linear
layer to K = method.proj_dim outputs (gain fixed at 1 with dino_norm_last_layer), whose gradients are dropped for
the first dino_freeze_last_layer_epochs. Two global crops; student views beyond the teacher's count (local crops)
are scored against every teacher view.

BatchFormer sits on the bottleneck (position: projector): its stream goes through the shared prototype layer (the
paper's shared classifier) and is pulled towards the same teacher targets (the teacher has no BatchFormer).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from lightly.models.modules.heads import ProjectionHead
from lightly.models.utils import update_momentum
from torch import Tensor, nn

from batchssl.batchformer import two_stream_loss
from batchssl.config import BatchFormerConfig, MethodConfig
from batchssl.distributed import all_reduce_with_grad, world_size
from batchssl.methods.base import SSLMethod, upcast
from batchssl.methods.momentum import moco_momentum
from batchssl.views import GLOBAL_VIEWS


def dino_loss(student: list[Tensor], teacher_probs: list[Tensor], student_temp: float) -> Tensor:
    """Mean over pairs of a teacher view t and a student view s != t of the batch-mean cross-entropy
    H(P_t, P_s); teacher view i and student view i are the same crop."""
    log_p = [F.log_softmax(upcast(s) / student_temp, dim=-1) for s in student]
    terms = [
        -(t * log_p[j]).sum(dim=-1).mean() for i, t in enumerate(teacher_probs) for j in range(len(log_p)) if j != i
    ]
    return torch.stack(terms).mean()


def teacher_temperature(step: int, warmup_steps: float, start: float, end: float) -> float:
    """Linear from `start` at step 0 to `end` at `warmup_steps`, then constant."""
    return end if step >= warmup_steps else start + (end - start) * step / warmup_steps


@torch.no_grad()
def global_mean(rows: Tensor) -> Tensor:
    """Mean over the rows of every process: (1, K). Equal to the mean on the concatenated global batch."""
    total = rows.sum(dim=0, keepdim=True)
    if world_size() > 1:
        total = all_reduce_with_grad(total)
    return total / (rows.shape[0] * world_size())


class Prototypes(nn.Module):
    """DINO's last layer: l2-normalise, then a weight-normalised linear map to K scores (no bias)."""

    def __init__(self, dim: int, k: int, norm_last_layer: bool):
        super().__init__()
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(dim, k, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(x, dim=-1))


def dino_mlp(in_dim: int, cfg: MethodConfig) -> ProjectionHead:
    """Linear-GELU layers (BN when dino_head_bn) to the bottleneck, truncated-normal init (std 0.02) as DINO."""
    bn = (lambda: nn.BatchNorm1d(cfg.proj_hidden_dim)) if cfg.dino_head_bn else (lambda: None)
    blocks = [(in_dim, cfg.proj_hidden_dim, bn(), nn.GELU(), True)]
    blocks += [(cfg.proj_hidden_dim, cfg.proj_hidden_dim, bn(), nn.GELU(), True) for _ in range(cfg.proj_layers - 2)]
    blocks += [(cfg.proj_hidden_dim, cfg.dino_bottleneck_dim, None, None, True)]
    head = ProjectionHead(blocks)
    for m in head.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return head


class DINO(SSLMethod):
    schedules_in_epochs = True  # the registry passes train.epochs (teacher temperature warmup, last-layer freeze)

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        cfg: MethodConfig,
        batchformer: BatchFormerConfig,
        epochs: int | None = None,
    ):
        super().__init__(backbone, feature_dim, batchformer)
        if epochs is None and (cfg.teacher_temp_warmup_epochs or cfg.dino_freeze_last_layer_epochs):
            raise ValueError("DINO: epoch-based schedules need the run's number of epochs")
        self.cfg, self.epochs = cfg, epochs or 1
        self.projector = dino_mlp(feature_dim, cfg)  # to the bottleneck, where BatchFormer attends
        self.predictor = Prototypes(cfg.dino_bottleneck_dim, cfg.proj_dim, cfg.dino_norm_last_layer)
        self.backbone_momentum = copy.deepcopy(backbone).requires_grad_(False)
        self.projector_momentum = copy.deepcopy(self.projector).requires_grad_(False)
        self.predictor_momentum = copy.deepcopy(self.predictor).requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, cfg.proj_dim))
        self._frozen_last_layer = False
        for p in self.predictor.parameters():
            if p.requires_grad:  # a hook, not requires_grad toggling: DDP expects the same parameters every step
                p.register_hook(lambda g: torch.zeros_like(g) if self._frozen_last_layer else g)
        self._add_batchformer(cfg.dino_bottleneck_dim)

    def teacher_probs(self, views: list[Tensor], temperature: float) -> list[Tensor]:
        """The teacher's centred, sharpened distributions of the original images; updates the centre."""
        with torch.no_grad():
            out = [upcast(self.predictor_momentum(self.projector_momentum(self.backbone_momentum(x)))) for x in views]
            probs = [F.softmax((t - self.center) / temperature, dim=-1) for t in out]
            if self.training:
                batch_center = global_mean(torch.cat(out))
                self.center.mul_(self.cfg.center_momentum).add_(batch_center * (1 - self.cfg.center_momentum))
        return probs

    def loss(self, student: list[Tensor], teacher_probs: list[Tensor]) -> Tensor:
        return dino_loss(student, teacher_probs, self.cfg.temperature)

    def forward(self, views: list[Tensor], step: int = 0, total_steps: int = 1) -> dict[str, Tensor]:
        n, steps_per_epoch = views[0].shape[0], total_steps / self.epochs
        m = moco_momentum(step, total_steps, self.cfg.momentum, self.cfg.momentum_final)
        temp = teacher_temperature(
            step,
            self.cfg.teacher_temp_warmup_epochs * steps_per_epoch,
            self.cfg.teacher_temp_start,
            self.cfg.teacher_temp,
        )
        self._frozen_last_layer = step < self.cfg.dino_freeze_last_layer_epochs * steps_per_epoch
        z = self.project(views)  # bottleneck outputs ([:n] original, [n:] BatchFormer in training)
        if self.training:
            with torch.no_grad():
                for part in ("backbone", "projector", "predictor"):
                    update_momentum(getattr(self, part), getattr(self, f"{part}_momentum"), m)
        targets = self.teacher_probs(views[:GLOBAL_VIEWS], temp)
        scores = [self.predictor(x) for x in z]
        out = two_stream_loss(self.loss, scores, targets, self.bf_cfg.weight)
        # z_std of the K prototype scores (method.proj_dim, what the collapse alarm scales by): 0 when every image
        # gets the same scores, DINO's collapse
        return {
            **out,
            "z_std": self.z_std(scores[0][:n]),
            "momentum": torch.tensor(m),
            "teacher_temp": torch.tensor(temp),
        }
