"""benchmarks/quality.py end to end on a tiny slice: two recipes run at once (--jobs), linear probes, floors,
the JSON table and the plot, and a rerun that reuses the finished runs instead of training again."""

import json
import subprocess
import sys

import pytest

from helpers import REPO, TINY


@pytest.mark.slow
def test_quality_benchmark_runs_two_recipes_at_once_and_reuses_them(tmp_path):
    cmd = [sys.executable, "benchmarks/quality.py", "--recipes", "mocov3", "simsiam_bf", "--seeds", "0",
           "--holdout", "200", "--jobs", "2", "--out", str(tmp_path), "--set", *TINY, "--set", "monitor.k=20"]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("$ ") == 2  # one pretraining command per recipe
    out = tmp_path / "holdout200"
    table = json.loads((out / "quality.json").read_text())
    assert [row["recipe"] for row in table["rows"]] == ["mocov3", "simsiam_bf"]
    assert "data.holdout=200" in table["overrides"] and "monitor.k=20" in table["overrides"]  # both --set kept
    for row in table["rows"]:
        assert 0 < row["knn_top1"][0] <= 100 and 0 < row["linear_top1"][0] <= 100 and row["minutes"][0] > 0
        run = out / f"{row['recipe']}_s0"
        knn = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "knn_top1" in line]
        assert knn[-1]["knn_top1"] == row["knn_top1"][0]  # the final epoch's monitor line
        assert (out / f"{row['recipe']}_s0.log").is_file()  # the run's output, kept beside it
    assert 0 < table["floors"]["raw_pixels"] <= 100 and len(table["floors"]["random_init"]) == 1
    assert (out / "knn_over_epochs.png").stat().st_size > 0

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "$ " not in again.stdout  # nothing was trained again
    assert json.loads((out / "quality.json").read_text())["rows"] == table["rows"]


def _load_benchmark_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("overrides", [[], ["batchformer.scope=per_view"],
                                       ["batchformer.position=backbone", "train.batch_size=64"]])
def test_batchformer_flops_closed_form_matches_flop_counter(overrides):
    """The BatchFormer layer's FLOPs in a training step of the default recipe, counted by FlopCounterMode on the
    meta device (benchmarks/flops.py, as train_throughput.py uses it), equal the closed form from its shapes."""
    import torch

    from batchssl.backbones import build_backbone
    from batchssl.config import load_config

    flops = _load_benchmark_module("flops")
    cfg = load_config(REPO / "recipes" / "fashion_mnist" / "mocov3_bf.yaml", overrides)
    with torch.device("meta"):
        feature_dim = build_backbone(cfg.model, 1, 28)[1]
    total, layer = flops.step_flops(cfg)
    assert layer == pytest.approx(flops.batchformer_flops_closed_form(cfg, feature_dim), rel=1e-9)
    assert 0 < layer < total
    no_bf, none = flops.step_flops(load_config(REPO / "recipes" / "fashion_mnist" / "mocov3_bf.yaml",
                                               overrides + ["batchformer.enabled=false"]))
    assert none is None and no_bf < total
