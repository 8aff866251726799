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
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="feature extraction; auto: the run's train.mixed_precision, as the live monitor",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. data.root=/datasets data.limit=null data.num_workers=8",
    )


def source_from_args(args: argparse.Namespace) -> FrozenSource:
    return FrozenSource(
        run=args.run,
        weights=args.backbone,
        arch=args.arch,
        dataset=args.dataset,
        out=args.out,
        precision=args.precision,
        overrides=list(args.overrides),
    )


def result_key(name: str, settings, source: FrozenSource) -> str:
    """What identifies a result: the evaluator, its settings, the feature precision and the config overrides."""
    from dataclasses import asdict

    fields = ", ".join(
        f"{k}={v}"
        for k, v in asdict(settings).items()
        if k not in ("num_workers", "batch_size") or name.startswith("linear")
    )
    overrides = " ".join(sorted(source.overrides))
    return f"{name} [{fields}] precision={source.precision}" + (f" {overrides}" if overrides else "")


def record_result(path: Path, key: str, record: dict) -> dict:
    """Add `record` under `key` to the results file at `path`, keeping the entries of other settings, so that one
    call can never erase another's result. Layout: {"entries": {key: record, ...}, "latest": key}; a file of any
    other content is refused rather than overwritten."""
    from batchssl.report import read_results

    document = read_results(path) if path.is_file() else {"entries": {}}
    document["entries"][key] = record
    document["latest"] = key
    atomic_write(path, json.dumps(document, indent=1) + "\n")
    return document


def run_lock(frozen_out: Path, source: FrozenSource, purpose: str):
    """The run directory's lock when the evaluator writes into a run (a live pretraining holds it); else none.
    Only the main process (RANK 0) of a multi-process evaluation takes it."""
    import os
    from contextlib import nullcontext

    from batchssl.checkpoint import RunLock

    return RunLock(frozen_out, purpose) if source.run and os.environ.get("RANK", "0") == "0" else nullcontext()
