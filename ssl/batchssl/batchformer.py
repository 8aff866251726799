"""BatchFormer (Hou et al., CVPR 2022): a transformer encoder layer whose sequence axis is the batch.

Applied to the two views' outputs (projector or backbone, see DESIGN.md):
- scope 'joint': one attention over all 2N outputs of both views, each sample's own other view masked out, so
  the positive pair never reaches the query through attention;
- scope 'per_view': attention within each view's N outputs (the paper's released MoCo v3 code);
- gather: attend over the global batch of all processes, with gradients flowing back to each process.
Training only: `two_streams` returns the inputs untouched in eval mode, and the exported backbone never holds it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from batchssl.config import BatchFormerConfig
from batchssl.distributed import all_gather_grad, rank


@functools.lru_cache(maxsize=8)  # one mask per (batch, processes, device): not rebuilt every step
def joint_mask(n: int, blocks: int, device: torch.device) -> Tensor:
    """Bool (M, M) attention mask, True = may not attend, for M = blocks * 2n rows laid out per process as
    [view 1 of its n samples; view 2 of its n samples]: row i may not see its own sample's other view."""
    m = blocks * 2 * n
    rows = torch.arange(m, device=device)
    block, within = rows // (2 * n), rows % (2 * n)
    partner = block * 2 * n + (within + n) % (2 * n)
    mask = torch.zeros(m, m, dtype=torch.bool, device=device)
    mask[rows, partner] = True
    return mask


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
        if len(views) != 2:
            raise ValueError("BatchFormer scope 'joint' expects exactly two views")
        n = views[0].shape[0]
        out = self._attend_global(torch.cat(views), lambda blocks: joint_mask(n, blocks, views[0].device))
        return list(out.split(n))


def two_streams(batchformer: BatchFormer | None, views: list[Tensor]) -> list[Tensor]:
    """Per view, rows [:n] the original outputs and rows [n:] the BatchFormer outputs (training only).

    Whatever follows (projector, predictor, loss) is shared by both streams: the paper's shared classifier.
    """
    if batchformer is None or not batchformer.training:
        return views
    return [torch.cat([v, b]) for v, b in zip(views, batchformer(views))]


PairwiseLoss = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def two_stream_loss(pairwise: PairwiseLoss, online: tuple[Tensor, Tensor], targets: tuple[Tensor, Tensor],
                    weight: float) -> dict[str, Tensor]:
    """A method's symmetric loss `pairwise(online_1, online_2, target_1, target_2)` over both streams.

    `online` are the two views' predictor outputs as `two_streams` laid them out (n rows, or 2n with BatchFormer:
    [:n] original, [n:] BatchFormer); `targets` are the n original targets of each view (SimSiam's stop-gradient
    projections, MoCo v3's momentum keys): both streams are pulled towards the same targets.
    Returns {"loss": main + weight * bf, "loss_main", and "loss_bf" when the BatchFormer stream is there}.
    """
    n = targets[0].shape[0]
    main = pairwise(online[0][:n], online[1][:n], *targets)
    out = {"loss": main, "loss_main": main.detach()}
    if online[0].shape[0] > n:
        bf = pairwise(online[0][n:], online[1][n:], *targets)
        out["loss"] = main + weight * bf
        out["loss_bf"] = bf.detach()
    return out
