"""The frozen backbone that the evaluators score, from a run directory or from weights of elsewhere, and the
evaluation splits of its dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from batchssl.augment import eval_transform
from batchssl.backbones import build_backbone
from batchssl.checkpoint import BACKBONE_FILE, load_backbone
from batchssl.config import Config, apply_overrides, build_config, load_run_config, to_dict
from batchssl.cpu import effective_precision
from batchssl.data import DatasetInfo, Transformed, dataset_info, eval_datasets
from batchssl.distributed import make_accelerator
from batchssl.errors import UserError

if TYPE_CHECKING:
    import accelerate

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class FrozenSource:
    """Where the backbone comes from: a run directory, or weights + architecture + dataset."""

    run: str | None = None
    weights: str | None = None
    arch: str | None = None
    dataset: str | None = None
    out: str | None = None  # with weights: folder for the results (default: beside the weights)
    precision: str = "auto"  # feature extraction; auto: the run's train.mixed_precision, as the live monitor
    overrides: list[str] = field(default_factory=list)  # config overrides, e.g. data.root=/datasets


@dataclass
class Frozen:
    backbone: nn.Module
    feature_dim: int
    cfg: Config
    info: DatasetInfo
    out_dir: Path  # where the evaluator writes its JSON
    accelerator: accelerate.Accelerator  # one or several processes; the backbone is on its device
    dtype: torch.dtype | None  # feature-extraction autocast

    def eval_splits(self) -> tuple[Transformed, Transformed]:
        """(labelled training split, validation split), both with the evaluation transform."""
        return eval_splits(self.cfg, self.info)


def resolve(source: FrozenSource) -> tuple[Config, Path, Path]:
    """(config, weights file, output folder), checked before anything heavy is loaded."""
    if bool(source.run) == bool(source.weights):
        raise UserError("give either --run DIR or --backbone FILE --arch NAME --dataset NAME")
    if source.precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {source.precision!r}")
    if source.run:
        cfg = _with_overrides(load_run_config(source.run), source.overrides)
        weights, out_dir = Path(source.run) / BACKBONE_FILE, Path(source.run)
        if not weights.is_file():
            raise UserError(f"{source.run} has no {BACKBONE_FILE}: the run has not finished an epoch checkpoint yet")
        return cfg, weights, out_dir
    if not (source.arch and source.dataset):
        raise UserError("--backbone needs --arch and --dataset")
    cfg = _with_overrides(Config(), [f"model.arch={source.arch}", f"data.name={source.dataset}", *source.overrides])
    weights = Path(source.weights)
    if not weights.is_file():
        raise UserError(f"backbone weights not found: {weights}")
    return cfg, weights, Path(source.out) if source.out else weights.parent


def load_frozen(source: FrozenSource) -> Frozen:
    cfg, weights, out_dir = resolve(source)
    info = dataset_info(cfg.data)
    backbone, feature_dim = build_backbone(cfg.model, info.in_channels, info.image_size)
    load_backbone(backbone, weights)
    accelerator = make_accelerator()
    # auto: the precision the run really trained and monitored in (bf16 falls back to fp32 on CPUs without it)
    run_precision = effective_precision(cfg.train.mixed_precision, accelerator.device.type == "cpu")
    dtype = feature_dtype(run_precision if source.precision == "auto" else source.precision)
    backbone = backbone.requires_grad_(False).eval().to(accelerator.device)
    return Frozen(backbone, feature_dim, cfg, info, out_dir, accelerator, dtype)


def eval_splits(cfg: Config, info: DatasetInfo) -> tuple[Transformed, Transformed]:
    bank, val = eval_datasets(cfg.data)
    transform = eval_transform(info)
    return Transformed(bank, transform), Transformed(val, transform)


def feature_dtype(precision: str) -> torch.dtype | None:
    """Autocast dtype for feature extraction: 'no'/'fp32' -> None (float32), 'bf16', 'fp16'. The monitor passes
    the run's train.mixed_precision and the evaluators do the same by default, so their numbers agree."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def _with_overrides(cfg: Config, overrides: list[str]) -> Config:
    return build_config(apply_overrides(to_dict(cfg), overrides))
