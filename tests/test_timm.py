"""`model.arch=timm:<name>`: the backbone IS timm.create_model(name, pretrained=False, num_classes=0, in_chans=C),
so its exported backbone.safetensors loads into timm's own model as it is; a run with it trains, is monitored and
is scored by both evaluators, which rebuild it from config.yaml."""

import json

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

import batchssl.data as data
from batchssl.backbones import build_backbone
from batchssl.checkpoint import export_backbone
from batchssl.config import ModelConfig, load_config
from batchssl.errors import UserError
from helpers import REPO, read_metrics

timm = pytest.importorskip("timm")


def same_outputs(ours, theirs, x) -> bool:
    ours.eval(), theirs.eval()
    with torch.no_grad():
        return torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize(
    "arch, timm_kwargs, channels, size, dim",
    [
        ("timm:resnet18", {}, 3, 32, 512),
        # a ViT is rebuilt for the data's size (and model.patch_size): timm's own img_size / patch_size arguments
        ("timm:test_vit", {"img_size": 32, "patch_size": 4}, 3, 32, 64),
    ],
)
def test_exported_weights_load_into_timm_exactly(arch, timm_kwargs, channels, size, dim, tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, patch_size=timm_kwargs.get("patch_size"))
    ours, feature_dim = build_backbone(cfg, channels, size)
    assert feature_dim == dim
    export_backbone(ours, tmp_path / "backbone.safetensors")
    name = arch.removeprefix("timm:")
    theirs = timm.create_model(name, num_classes=0, in_chans=channels, **timm_kwargs)
    theirs.load_state_dict(load_file(str(tmp_path / "backbone.safetensors")), strict=True)
    x = torch.randn(2, channels, size, size)
    assert same_outputs(ours, theirs, x)
    assert ours(x).shape == (2, dim)


def test_unknown_timm_model_is_a_user_error():
    with pytest.raises(UserError, match=r"timm has no model of that name \(did you mean timm:resnet18"):
        load_config(None, ["model.arch=timm:resnet81"])
    with pytest.raises(UserError, match=r"'timm:<model name>', got 'resnet81'"):
        load_config(None, ["model.arch=resnet81"])


@pytest.fixture
def fake_fashion_mnist(monkeypatch):
    """64 random 28 x 28 images with labels 0..9 in turn for every split (the pretraining split, the kNN bank and
    the probes' splits all come through data.load_split)."""

    def load_split(cfg, split):
        rng = np.random.default_rng(1 if split == "test" else 0)
        return data.ArrayImages(rng.integers(0, 256, (64, 28, 28), dtype=np.uint8), np.arange(64) % 10)

    monkeypatch.setattr(data, "load_split", load_split)


@pytest.fixture
def fresh_process_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_a_timm_run_trains_is_monitored_and_evaluated(tmp_path, fake_fashion_mnist, fresh_process_state):
    """The default recipe (MoCo v3 + BatchFormer, bf16 where the CPU has it) on timm's tiny test ResNet."""
    import knn_eval.__main__ as knn_cli
    import linear_probe.__main__ as probe_cli
    from batchssl.train import train

    run = tmp_path / "run"
    cfg = load_config(
        REPO / "recipes" / "fashion_mnist" / "mocov3_bf.yaml",
        [
            "model.arch=timm:test_resnet",
            "train.epochs=1",
            "train.batch_size=32",
            "train.log_every_n_steps=1",
            "method.proj_hidden_dim=64",
            "method.proj_dim=32",
            "monitor.k=10",
            "monitor.batch_size=32",
            f"output_dir={run}",
        ],
    )
    train(cfg)
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    assert [m["epoch"] for m in metrics if "knn_top1" in m] == [1]

    theirs = timm.create_model("test_resnet", num_classes=0, in_chans=1)
    theirs.load_state_dict(load_file(str(run / "backbone.safetensors")), strict=True)

    knn_cli.main(["--run", str(run), "--k", "10", "--batch-size", "32"])
    probe_cli.main(["--run", str(run), "--epochs", "2", "--lrs", "0.1", "--batch-size", "32"])
    for name in ("knn.json", "linear_probe.json"):
        assert json.loads((run / name).read_text()), name
