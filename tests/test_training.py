"""Real training runs on a few hundred Fashion-MNIST images: the recipes, resume, bad input. train() runs in this
process (helpers.pretrain_in_process) where no process boundary is under test; the CLI's one-line errors keep a
subprocess test."""

import json
import math
import re
import shutil

import pytest

from batchssl.backbones import build_backbone
from batchssl.checkpoint import complete_checkpoints, load_backbone
from batchssl.config import load_run_config
from batchssl.data import dataset_info
from batchssl.errors import UserError
from helpers import TINY, pretrain_in_process, read_metrics, run_pretrain, step_losses


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["simsiam", "simsiam_bf", "mocov3", "mocov3_bf"])
def test_fashion_mnist_recipe_runs(recipe, tmp_path):
    pretrain_in_process(["--config", f"recipes/fashion_mnist/{recipe}.yaml", *TINY, f"output_dir={tmp_path}"])
    metrics = read_metrics(tmp_path)
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    for m in steps:
        assert {"epoch", "step", "loss", "lr", "z_std", "images_per_s"} <= set(m)
        assert ("loss_bf" in m) == recipe.endswith("_bf")
        assert ("momentum" in m) == recipe.startswith("mocov3")
    knn = [m for m in metrics if "knn_top1" in m]
    # One kNN line over the 200 validation images (scores in steps of 0.5%); no accuracy bar after 4 steps.
    assert len(knn) == 1 and knn[0]["knn_seconds"] > 0
    assert 0.0 <= knn[0]["knn_top1"] <= knn[0]["knn_top5"] <= 100.0
    assert (knn[0]["knn_top1"] * 2).is_integer() and (knn[0]["knn_top5"] * 2).is_integer()
    cfg = load_run_config(tmp_path)
    assert cfg.train.epochs == 1 and cfg.data.limit == 256
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["epoch_0001"]
    info = dataset_info(cfg.data)
    backbone, _ = build_backbone(cfg.model, info.in_channels, info.image_size)
    load_backbone(backbone, tmp_path / "backbone.safetensors")  # strict: backbone keys only


@pytest.mark.slow
def test_compiled_backbone_trains_like_the_eager_one_and_keeps_its_names(tmp_path):
    # train.compile=backbone on the recipe's path (bf16 autocast + channels_last, the device pipeline): the loss of
    # step 1 equals the eager run's to bf16's rounding (the same weights and views; inductor fuses and reorders),
    # the run trains on, and its checkpoint and backbone export keep the eager parameter names.
    args = [
        "--config",
        "recipes/fashion_mnist/mocov3_bf.yaml",
        *TINY,
        "data.limit=128",
        "monitor.enabled=false",
        "batchformer.dropout=0.0",
    ]
    run_pretrain([*args, f"output_dir={tmp_path / 'eager'}"])
    run_pretrain([*args, "train.compile=backbone", f"output_dir={tmp_path / 'compiled'}"], timeout=900)
    eager, compiled = step_losses(tmp_path / "eager"), step_losses(tmp_path / "compiled")
    assert sorted(compiled) == [1, 2] and all(math.isfinite(v) for v in compiled.values())
    assert compiled[1] == pytest.approx(eager[1], abs=3e-2)
    cfg = load_run_config(tmp_path / "compiled")
    info = dataset_info(cfg.data)
    backbone, _ = build_backbone(cfg.model, info.in_channels, info.image_size)
    load_backbone(backbone, tmp_path / "compiled" / "backbone.safetensors")  # strict: no _orig_mod. prefix


def _one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A finished one-epoch run without the monitor; each test below resumes a copy of it in a way that must fail."""
    run = tmp_path_factory.mktemp("one_epoch")
    pretrain_in_process([*TINY, "monitor.enabled=false", f"output_dir={run}"])
    return run


def error_of(args) -> str:
    """The UserError train() stops with (pretrain.py prints it as one line and exits 2)."""
    with pytest.raises(UserError) as stopped:
        pretrain_in_process(args)
    return str(stopped.value)


def resume_args(one_epoch, out, *changes) -> list[str]:
    """A copy of the one-epoch run in `out` and the command that resumes it with `changes`. allow_changes lets
    the run get past the check of changed settings (tests/test_bad_input.py) to the failure under test."""
    shutil.copytree(one_epoch, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".lock"))
    return [*TINY, "monitor.enabled=false", f"output_dir={out}", "checkpoint.allow_changes=true", *changes]


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(one_epoch, tmp_path):
    args = resume_args(one_epoch, tmp_path, "train.epochs=3", "optim.base_lr=1e38")
    good = (tmp_path / "checkpoints" / "epoch_0001" / "model.safetensors").read_bytes()
    line = error_of(args)
    found = re.search(r"loss is (nan|inf) at step (\d+) \(epoch (\d+)\)", line)
    assert found, line
    step, epoch = int(found[2]), int(found[3])
    assert 5 <= step <= 12 and epoch == (step - 1) // 4 + 1  # a step after the resumed checkpoint, its epoch
    assert f"Newest good checkpoint: {tmp_path / 'checkpoints' / 'epoch_0001'}." in line
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["epoch_0001"]
    assert (tmp_path / "checkpoints" / "epoch_0001" / "model.safetensors").read_bytes() == good


@pytest.mark.slow
def test_resuming_another_architecture_or_method_is_refused(one_epoch, tmp_path):
    for name, change, difference in [
        ("width", "model.width=0.5", "width: checkpoint 0.25 vs run 0.5"),
        ("method", "method.name=simsiam", "method: checkpoint 'mocov3' vs run 'simsiam'"),
    ]:
        out = tmp_path / name
        args = resume_args(one_epoch, out, "train.epochs=2", change)
        before = sorted(p.name for p in (out / "checkpoints").iterdir())
        line = error_of(args)
        assert "written for another model" in line and difference in line
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


@pytest.mark.slow
def test_broken_checkpoint_is_one_line(one_epoch, tmp_path):
    args = resume_args(one_epoch, tmp_path, "train.epochs=2")
    (tmp_path / "checkpoints" / "epoch_0001" / "model.safetensors").write_bytes(b"not a safetensors file")
    line = error_of(args)
    assert f"checkpoint {tmp_path / 'checkpoints' / 'epoch_0001'} is damaged" in line
    assert "start afresh in another output_dir" in line


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
    result = run_pretrain(["data.name=cifar10", f"data.root={tmp_path}", f"output_dir={tmp_path / 'run'}"], check=False)
    assert "cifar10 not found" in _one_line_error(result)
    assert not (tmp_path / "run" / "checkpoints").exists()
