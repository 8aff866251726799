"""What both evaluators need: the frozen backbone and the datasets of a run directory (or of weights from
elsewhere), and a common command-line front."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from batchssl.backbones import build_backbone
from batchssl.checkpoint import BACKBONE_FILE, load_backbone
from batchssl.config import Config, apply_overrides, build_config, load_run_config, to_dict
from batchssl.data import DatasetInfo, dataset_info
from batchssl.distributed import make_accelerator
from batchssl.errors import UserError

if TYPE_CHECKING:
    import accelerate


@dataclass
class Frozen:
    backbone: nn.Module
    feature_dim: int
    cfg: Config
    info: DatasetInfo
    out_dir: Path  # where the evaluator writes its JSON
    accelerator: "accelerate.Accelerator"  # one or several processes; the backbone is on its device
    dtype: torch.dtype | None  # feature-extraction autocast (--precision)


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", help="run directory of pretrain.py (config.yaml + backbone.safetensors)")
    parser.add_argument("--backbone", help="weights from elsewhere (.safetensors or a torch file; torchvision keys)")
    parser.add_argument("--arch", help="with --backbone: resnet18 | resnet50 | vit_tiny | vit_small | vit_base")
    parser.add_argument("--dataset", help="with --backbone: fashion_mnist | cifar10 | cifar100 | stl10 | imagefolder")
    parser.add_argument("--out", help="with --backbone: folder for the JSON result (default: beside the weights)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                        help="feature extraction; auto: the run's train.mixed_precision, as the live monitor")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. data.root=/datasets data.limit=null data.num_workers=8")


def _with_overrides(cfg: Config, overrides: list[str]) -> Config:
    return build_config(apply_overrides(to_dict(cfg), overrides))


def load_frozen(args: argparse.Namespace) -> Frozen:
    if bool(args.run) == bool(args.backbone):
        raise UserError("give either --run DIR or --backbone FILE --arch NAME --dataset NAME")
    if args.run:
        cfg = _with_overrides(load_run_config(args.run), args.overrides)
        weights, out_dir = Path(args.run) / BACKBONE_FILE, Path(args.run)
        if not weights.is_file():
            raise UserError(f"{args.run} has no {BACKBONE_FILE}: the run has not finished an epoch checkpoint yet")
    else:
        if not (args.arch and args.dataset):
            raise UserError("--backbone needs --arch and --dataset")
        base = [f"model.arch={args.arch}", f"data.name={args.dataset}"]
        cfg = _with_overrides(Config(), base + args.overrides)
        weights = Path(args.backbone)
        out_dir = Path(args.out) if args.out else weights.parent
    info = dataset_info(cfg.data)
    backbone, feature_dim = build_backbone(cfg.model, info.in_channels, info.image_size)
    load_backbone(backbone, weights)
    accelerator = make_accelerator()
    dtype = feature_dtype(cfg.train.mixed_precision if args.precision == "auto" else args.precision)
    backbone = backbone.requires_grad_(False).eval().to(accelerator.device)
    return Frozen(backbone, feature_dim, cfg, info, out_dir, accelerator, dtype)


def feature_dtype(precision: str) -> torch.dtype | None:
    """Autocast dtype for feature extraction: 'no'/'fp32' -> None (float32), 'bf16', 'fp16'. The monitor passes
    the run's train.mixed_precision and the evaluators do the same by default, so their numbers agree."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
