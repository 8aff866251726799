"""The evaluator entry points on a real short run: monitor == CLI, both probe modes, bad input."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from batchssl.backbones import build_backbone
from batchssl.checkpoint import export_backbone
from batchssl.config import ModelConfig
from helpers import REPO, TINY, read_metrics, run_pretrain


def run_module(module: str, *args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{module} {args} failed:\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    run_pretrain([*TINY, "monitor.k=200", "monitor.temperature=0.07", f"output_dir={run}"])
    return run


@pytest.mark.slow
def test_monitor_number_equals_cli_number(short_run):
    monitor = [m for m in read_metrics(short_run) if "knn_top1" in m][-1]
    out = run_module("knn_eval", "--run", str(short_run), "--k", "20", "200", "--temperature", "0.07")
    document = json.loads((short_run / "knn.json").read_text())
    assert len(document["entries"]) == 1
    knn = document["entries"][document["latest"]]
    assert knn["results"]["200"]["top1"] == monitor["knn_top1"]
    assert knn["results"]["200"]["top5"] == monitor["knn_top5"]
    assert knn["bank"] == 256 and knn["queries"] == 200
    assert "top-1" in out.stdout and f"{monitor['knn_top1']:.2f}" in out.stdout


@pytest.mark.slow
def test_linear_probe_cached_and_augmented_on_a_real_slice(short_run):
    run_module("linear_probe", "--run", str(short_run), "--epochs", "20")
    run_module("linear_probe", "--run", str(short_run), "--mode", "augmented", "--epochs", "4",
               "--batch-size", "64", "--base-lr", "1")
    document = json.loads((short_run / "linear_probe.json").read_text())
    modes = {entry["mode"]: entry for entry in document["entries"].values()}
    assert sorted(modes) == ["augmented", "cached"] and len(document["entries"]) == 2
    assert document["entries"][document["latest"]] is not modes["cached"]  # the augmented run came last
    cached, augmented = modes["cached"], modes["augmented"]
    assert cached["lr"] in [g["lr"] for g in cached["grid"]]
    best = max(cached["grid"], key=lambda g: g["val_top1"])["val_top1"]
    assert cached["val_top1"] == best  # chosen on the held-out part of the training split
    for result in (cached, augmented):
        assert 10.0 < result["top1"] <= 100.0 and result["top1"] <= result["top5"]
    assert (short_run / "linear_probe_ckpt").is_dir()  # per-epoch checkpoint of the augmented probe
    report = run_module("batchssl.report", str(short_run)).stdout
    assert "linear probe (cached)" in report and "kNN monitor" in report


def _one_line(result) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("module", ["knn_eval", "linear_probe"])
def test_missing_run_directory(module, tmp_path):
    assert "run directory not found" in _one_line(run_module(module, "--run", str(tmp_path / "no"), check=False))


@pytest.mark.slow
def test_bad_runs_and_weights(short_run, tmp_path):
    # a run without backbone.safetensors
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.yaml").write_text((short_run / "config.yaml").read_text())
    assert "has no backbone.safetensors" in _one_line(run_module("knn_eval", "--run", str(partial), check=False))
    # weights that fit the architecture, of a dataset that is not there
    fitting = tmp_path / "cifar_resnet18.safetensors"
    export_backbone(build_backbone(ModelConfig(arch="resnet18", width=0.25), in_channels=3, image_size=32)[0], fitting)
    line = _one_line(run_module("knn_eval", "--backbone", str(fitting), "--arch", "resnet18", "--dataset", "cifar10",
                                "model.width=0.25", f"data.root={tmp_path / 'no_data'}", check=False))
    assert f"cifar10 not found in {tmp_path / 'no_data'}" in line and "data.download=true" in line
    # weights that do not match the architecture
    wrong = tmp_path / "wrong.safetensors"
    save_file({"conv1.weight": torch.zeros(3, 3, 3, 3)}, str(wrong))
    line = _one_line(run_module("linear_probe", "--backbone", str(wrong), "--arch", "resnet18", "--dataset",
                                "fashion_mnist", check=False))
    assert "do not match the architecture" in line
