"""BatchFormer (Hou et al., CVPR 2022): a transformer encoder layer whose sequence axis is the batch.

Applied to the views' outputs (projector or backbone, see docs), any number of views (two global + local crops):
- scope 'joint': one attention over all V*N outputs of the views, each sample's own other views masked out, so
  a positive pair never reaches the query through attention;
- scope 'per_view': attention within each view's N outputs (the paper's released MoCo v3 code);
- gather: attend over the global batch of all processes, with gradients flowing back to each process.
Training only: `two_streams` returns the inputs untouched in eval mode, and the exported backbone never holds it.

`two_stream_loss(loss, online, targets, weight)` gives a method's loss over the original and the BatchFormer
stream; `cross_view_loss` is the usual multi-view loss to pass it (every online view against every target view
but its own).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from batchssl.config import BatchFormerConfig
from batchssl.distributed import all_gather_grad, rank


@functools.lru_cache(maxsize=8)  # one mask per (batch, processes, views, device): not rebuilt every step
def joint_mask(n: int, blocks: int, device: torch.device, views: int = 2) -> Tensor:
    """Bool (M, M) attention mask, True = may not attend, for M = blocks * views * n rows laid out per process as
    [view 1 of its n samples; view 2 ...; view V]: a row may not see its own sample's other views."""
    rows = torch.arange(blocks * views * n, device=device)
    block, sample = rows // (views * n), rows % n
    key = block * n + sample  # which (process, sample) a row belongs to
    same_sample = key.view(-1, 1) == key.view(1, -1)
    return same_sample & (rows.view(-1, 1) != rows.view(1, -1))


class BatchFormer(nn.Module):
    def __init__(self, dim: int, cfg: BatchFormerConfig):
        super().__init__()
        if dim % cfg.nhead:
            raise ValueError(f"BatchFormer: dimension {dim} is not divisible by batchformer.nhead={cfg.nhead}")
        self.layer = nn.TransformerEncoderLayer(dim, cfg.nhead, dim_feedforward=dim, dropout=cfg.dropout)
        self.scope, self.gather = cfg.scope, cfg.gather

    def _attend(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        # (sequence = batch, 1, C): every sample is a token of one sequence.
        return self.layer(x.unsqueeze(1), src_mask=mask).squeeze(1)

    def _attend_global(self, x: Tensor, mask_fn=None) -> Tensor:
        """Attend over the concatenation of x across processes (if gather), return this process's rows."""
        full = all_gather_grad(x) if self.gather else x
        blocks = full.shape[0] // x.shape[0]
        out = self._attend(full, mask_fn(blocks) if mask_fn else None)
        start = (rank() if self.gather else 0) * x.shape[0]
        return out[start : start + x.shape[0]]

    def forward(self, views: list[Tensor]) -> list[Tensor]:
        if self.scope == "per_view":
            return [self._attend_global(v) for v in views]
        n = views[0].shape[0]
        if any(v.shape[0] != n for v in views):
            raise ValueError(f"BatchFormer: every view needs the same rows, got {[v.shape[0] for v in views]}")
        out = self._attend_global(torch.cat(views), lambda blocks: joint_mask(n, blocks, views[0].device, len(views)))
        return list(out.split(n))


def two_streams(batchformer: BatchFormer | None, views: list[Tensor]) -> list[Tensor]:
    """Per view, rows [:n] the original outputs and rows [n:] the BatchFormer outputs (training only).

    Whatever follows (projector, predictor, loss) is shared by both streams: the paper's shared classifier.
    """
    if batchformer is None or not batchformer.training:
        return views
    return [torch.cat([v, b]) for v, b in zip(views, batchformer(views))]


ViewsLoss = Callable[[list[Tensor], list[Tensor]], Tensor]  # (online outputs per view, targets per view)


def two_stream_loss(
    loss: ViewsLoss, online: Sequence[Tensor], targets: Sequence[Tensor], weight: float, n: int | None = None
) -> dict[str, Tensor]:
    """A method's loss `loss(online_views, target_views)` over both streams.

    `online` are the views' online outputs (e.g. predictor outputs; any number of views) as `two_streams` laid
    them out: n rows, or 2n with BatchFormer ([:n] original, [n:] BatchFormer). `targets` are the original
    targets of some views (n rows each: SimSiam's stop-gradient projections, a momentum encoder's or a teacher's
    outputs on the global views): both streams are pulled towards the same targets. n: the original rows,
    default targets[0]'s (give it when there are no targets).
    Returns {"loss": main + weight * bf, "loss_main", and "loss_bf" when the BatchFormer stream is there}.
    """
    targets = list(targets)
    n = targets[0].shape[0] if n is None else n
    main = loss([o[:n] for o in online], targets)
    out = {"loss": main, "loss_main": main.detach()}
    if online[0].shape[0] > n:
        bf = loss([o[n:] for o in online], targets)
        out["loss"] = main + weight * bf
        out["loss_bf"] = bf.detach()
    return out


def cross_view_loss(
    pair: Callable[[Tensor, Tensor], Tensor], online: Sequence[Tensor], targets: Sequence[Tensor]
) -> Tensor:
    """Mean of pair(online[i], targets[j]) over every online view i and target view j with i != j.

    Online view i and target view j are the same view when i == j (targets are the first views: the global
    crops). Two views: (pair(o1, t2) + pair(o2, t1)) / 2; two targets and V online views: 2 (V - 1) pairs, the
    multi-crop average of SwAV and DINO.
    """
    terms = [pair(o, t) for i, o in enumerate(online) for j, t in enumerate(targets) if i != j]
    if not terms:
        raise ValueError(f"no pair of distinct views among {len(online)} online and {len(targets)} target views")
    return sum(terms) / len(terms)
