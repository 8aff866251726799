"""The evaluator entry points on a real short run: monitor == evaluator, both probe modes, bad input.

The evaluators' main(argv) runs in this process (as in the pretraining run that made the monitor's number, so both
extract features with the same kernels); one test runs each evaluator as a real process (exit status, stderr)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from batchssl.backbones import build_backbone
from batchssl.checkpoint import export_backbone
from batchssl.config import ModelConfig, load_run_config
from batchssl.data import eval_datasets
from helpers import main_in_process, read_metrics, run_entry
from knn_eval.__main__ import main as knn_main
from linear_probe.__main__ import main as probe_main


@pytest.fixture(scope="module")
def short_run(tiny_run):
    """The default recipe on TINY (conftest's session run): its monitor scores k = 200, T = 0.07."""
    return tiny_run.path


def _class_counts(run) -> np.ndarray:
    """Images per class in the run's validation split (the queries)."""
    _, val = eval_datasets(load_run_config(run).data)
    return np.bincount([val[i][1] for i in range(len(val))], minlength=10)


@pytest.mark.slow
def test_monitor_number_equals_evaluator_number(short_run, capsys):
    monitor = [m for m in read_metrics(short_run) if "knn_top1" in m][-1]
    main_in_process(knn_main, ["--run", short_run, "--k", "20", "200", "--temperature", "0.07"])
    document = json.loads((short_run / "knn.json").read_text())
    assert len(document["entries"]) == 1
    knn = document["entries"][document["latest"]]
    assert knn["results"]["200"]["top1"] == monitor["knn_top1"]
    assert knn["results"]["200"]["top5"] == monitor["knn_top5"]
    assert knn["bank"] == 256 and knn["queries"] == 200
    out = capsys.readouterr().out
    assert "top-1" in out and f"{monitor['knn_top1']:.2f}" in out


@pytest.mark.slow
def test_linear_probe_cached_and_augmented_on_a_real_slice(short_run):
    main_in_process(probe_main, ["--run", short_run, "--epochs", "20"])
    main_in_process(
        probe_main, ["--run", short_run, "--mode", "augmented", "--epochs", "4", "--batch-size", "64", "--base-lr", "1"]
    )
    document = json.loads((short_run / "linear_probe.json").read_text())
    modes = {entry["mode"]: entry for entry in document["entries"].values()}
    assert sorted(modes) == ["augmented", "cached"] and len(document["entries"]) == 2
    assert document["entries"][document["latest"]] is not modes["cached"]  # the augmented run came last
    cached, augmented = modes["cached"], modes["augmented"]
    assert cached["lr"] in [g["lr"] for g in cached["grid"]]
    best = max(cached["grid"], key=lambda g: g["val_top1"])["val_top1"]
    assert cached["val_top1"] == best  # chosen on the held-out part of the training split
    # top-1 is the query-weighted mean of the per-class accuracies: both come from the same predictions
    counts = _class_counts(short_run)
    for result in (cached, augmented):
        assert 0.0 <= result["top1"] <= result["top5"] <= 100.0
        per_class = np.array([a if a is not None else 0.0 for a in result["per_class"]])
        assert result["top1"] == pytest.approx(float((per_class * counts).sum() / counts.sum()))
    assert (short_run / "linear_probe_ckpt").is_dir()  # per-epoch checkpoint of the augmented probe
    # batchssl.report's one run as a real process: the table of this run
    report = run_entry("-m", "batchssl.report", short_run, "--no-curves").stdout
    assert "linear probe (cached)" in report and "kNN monitor" in report


@pytest.mark.parametrize("module", ["knn_eval", "linear_probe"])
def test_missing_run_directory(module, tmp_path):
    # Each evaluator as a real process: exit status 2, one line, no traceback.
    result = run_entry("-m", module, "--run", tmp_path / "no", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == f"{module}: error: run directory not found: {tmp_path / 'no'}"


def _one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-2000:]
    return stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_bad_runs_and_weights(short_run, tmp_path):
    # a run without backbone.safetensors
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.yaml").write_text((short_run / "config.yaml").read_text())
    assert "has no backbone.safetensors" in _one_line(main_in_process(knn_main, ["--run", partial], expect=2))
    # weights that fit the architecture, of a dataset that is not there
    fitting = tmp_path / "cifar_resnet18.safetensors"
    export_backbone(build_backbone(ModelConfig(arch="resnet18", width=0.25), in_channels=3, image_size=32)[0], fitting)
    line = _one_line(
        main_in_process(
            knn_main,
            [
                "--backbone",
                fitting,
                "--arch",
                "resnet18",
                "--dataset",
                "cifar10",
                "model.width=0.25",
                f"data.root={tmp_path / 'no_data'}",
            ],
            expect=2,
        )
    )
    assert f"cifar10 not found in {tmp_path / 'no_data'}" in line and "data.download=true" in line
    # weights that do not match the architecture
    wrong = tmp_path / "wrong.safetensors"
    save_file({"conv1.weight": torch.zeros(3, 3, 3, 3)}, str(wrong))
    line = _one_line(
        main_in_process(probe_main, ["--backbone", wrong, "--arch", "resnet18", "--dataset", "fashion_mnist"], expect=2)
    )
    assert "do not match the architecture" in line
