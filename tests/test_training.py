"""Real training runs on a few hundred Fashion-MNIST images: the recipes, resume, bad input."""

import json
import signal
import subprocess
import sys
import time

import pytest

from batchssl.backbones import build_backbone
from batchssl.checkpoint import complete_checkpoints, load_backbone
from batchssl.config import load_run_config
from batchssl.data import dataset_info
from conftest import REPO, TINY, read_metrics, run_pretrain, step_losses


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["simsiam", "simsiam_bf", "mocov3", "mocov3_bf"])
def test_fashion_mnist_recipe_runs(recipe, tmp_path):
    run_pretrain(["--config", f"recipes/fashion_mnist/{recipe}.yaml", *TINY, f"output_dir={tmp_path}"])
    metrics = read_metrics(tmp_path)
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    for m in steps:
        assert {"epoch", "step", "loss", "lr", "z_std", "images_per_s"} <= set(m)
        assert ("loss_bf" in m) == recipe.endswith("_bf")
        assert ("momentum" in m) == recipe.startswith("mocov3")
    knn = [m for m in metrics if "knn_top1" in m]
    assert len(knn) == 1 and 10.0 < knn[0]["knn_top1"] <= 100.0 and knn[0]["knn_seconds"] > 0
    cfg = load_run_config(tmp_path)
    assert cfg.train.epochs == 1 and cfg.data.limit == 256
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["epoch_0001"]
    info = dataset_info(cfg.data)
    backbone, _ = build_backbone(cfg.model, info.in_channels, info.image_size)
    load_backbone(backbone, tmp_path / "backbone.safetensors")  # strict: backbone keys only


@pytest.mark.slow
def test_resume_after_kill_reproduces_the_uninterrupted_losses(tmp_path):
    args = ["--config", "recipes/fashion_mnist/simsiam_bf.yaml", *TINY, "train.epochs=3",
            "checkpoint.every_n_epochs=1", "checkpoint.keep_last=5", "monitor.every_n_epochs=1"]
    run_pretrain([*args, f"output_dir={tmp_path / 'straight'}"])
    straight = step_losses(tmp_path / "straight")
    assert sorted(straight) == list(range(1, 13))

    # Kill -9 as soon as the first epoch's checkpoint is complete, then rerun the very same command.
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "pretrain.py", *args, f"output_dir={killed}"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not complete_checkpoints(killed) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = complete_checkpoints(killed)
    assert resumed_from and resumed_from[-1].name != "epoch_0003"  # killed before the end
    result = run_pretrain([*args, f"output_dir={killed}"])
    assert f"resumed from {resumed_from[-1]}" in result.stdout + result.stderr
    again = step_losses(killed)
    assert sorted(again) == list(range(1, 13))  # lines of the interrupted epoch were replaced, not repeated
    assert again == straight  # exactly equal, step by step (the monitor's random draws included)
    assert [e for e, _ in knn_lines(killed)] == [1, 2, 3]  # each epoch's kNN line once, the checkpointed one's too
    assert knn_lines(killed) == knn_lines(tmp_path / "straight")


def knn_lines(run) -> list[tuple[int, float]]:
    return [(m["epoch"], m["knn_top1"]) for m in read_metrics(run) if "knn_top1" in m]


def _one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    return lines[-1]


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    args = [*TINY, "monitor.enabled=false", f"output_dir={tmp_path}"]
    run_pretrain(args)
    good = (tmp_path / "checkpoints" / "epoch_0001" / "model.safetensors").read_bytes()
    result = run_pretrain([*args, "train.epochs=3", "optim.base_lr=1e38"], check=False)
    line = _one_line_error(result)
    assert "loss is nan at step" in line or "loss is inf at step" in line
    assert "epoch_0001" in line
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["epoch_0001"]
    assert (tmp_path / "checkpoints" / "epoch_0001" / "model.safetensors").read_bytes() == good


@pytest.mark.slow
def test_resuming_another_architecture_or_method_is_refused(tmp_path):
    args = [*TINY, "monitor.enabled=false", f"output_dir={tmp_path}"]
    run_pretrain(args)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    for change, word in [("model.width=0.5", "width"), ("method.name=simsiam", "method")]:
        line = _one_line_error(run_pretrain([*args, "train.epochs=2", change], check=False))
        assert "written for another model" in line and word in line
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


@pytest.mark.slow
def test_broken_checkpoint_is_one_line(tmp_path):
    args = [*TINY, "monitor.enabled=false", f"output_dir={tmp_path}"]
    run_pretrain(args)
    (tmp_path / "checkpoints" / "epoch_0001" / "model.safetensors").write_bytes(b"not a safetensors file")
    line = _one_line_error(run_pretrain([*args, "train.epochs=2"], check=False))
    assert "is damaged" in line and "start afresh in another output_dir" in line


def test_half_written_checkpoint_is_ignored(tmp_path):
    done = tmp_path / "checkpoints" / "epoch_0001"
    done.mkdir(parents=True)
    (done / "trainer_state.json").write_text(json.dumps({"epoch": 1}))
    (tmp_path / "checkpoints" / ".tmp-epoch_0002").mkdir()  # killed while writing
    (tmp_path / "checkpoints" / "epoch_0003").mkdir()  # no state file: not complete
    assert complete_checkpoints(tmp_path) == [done]


def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    import batchssl.data as data
    from batchssl.config import DataConfig
    from batchssl.errors import UserError

    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(UserError, match="make setup.*data.download=true"):
        data.pretrain_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path)))
    with pytest.raises(UserError, match="cifar10 not found.*data.download=true"):
        data.pretrain_dataset(DataConfig(name="cifar10", root=str(tmp_path)))


def test_missing_dataset_cli_is_one_line(tmp_path):
    result = run_pretrain(["data.name=cifar10", f"data.root={tmp_path}", f"output_dir={tmp_path / 'run'}"],
                          check=False)
    assert "cifar10 not found" in _one_line_error(result)
    assert not (tmp_path / "run" / "checkpoints").exists()
