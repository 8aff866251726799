"""Command-line pieces the evaluators share: where the frozen backbone comes from, and the results file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from batchssl.eval.frozen import PRECISIONS, FrozenSource
from batchssl.files import atomic_write


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", help="run directory of pretrain.py (config.yaml + backbone.safetensors)")
    parser.add_argument("--backbone", help="weights from elsewhere (.safetensors or a torch file; torchvision keys)")
    parser.add_argument("--arch", help="with --backbone: resnet18 | resnet50 | vit_tiny | vit_small | vit_base")
    parser.add_argument("--dataset", help="with --backbone: fashion_mnist | cifar10 | cifar100 | stl10 | imagefolder")
    parser.add_argument("--out", help="with --backbone: folder for the JSON result (default: beside the weights)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="feature extraction; auto: the run's train.mixed_precision, as the live monitor")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. data.root=/datasets data.limit=null data.num_workers=8")


def source_from_args(args: argparse.Namespace) -> FrozenSource:
    return FrozenSource(run=args.run, weights=args.backbone, arch=args.arch, dataset=args.dataset, out=args.out,
                        precision=args.precision, overrides=list(args.overrides))


def write_json(path: Path, record: dict) -> None:
    atomic_write(path, json.dumps(record, indent=1) + "\n")
