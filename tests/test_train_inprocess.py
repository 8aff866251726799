"""batchssl.train.train() in this process on a small in-memory fake dataset (no subprocess, no Fashion-MNIST files):
the run directory it leaves is the contract the evaluators, resume and the report rely on."""

import json
import math

import pytest
import torch
from accelerate.state import AcceleratorState

import batchssl.data as data
from batchssl.backbones import build_backbone
from batchssl.checkpoint import complete_checkpoints, load_backbone, load_backbone_weights, model_signature, read_state
from batchssl.config import load_config, load_run_config, to_dict
from batchssl.optim import peak_lr, warmup_cosine
from batchssl.train import Callback
from helpers import REPO, SHRUNK, fake_fashion_mnist_split, read_metrics, step_losses

fake_split = fake_fashion_mnist_split(32)  # 2 steps of 16 an epoch


@pytest.fixture
def fake_fashion_mnist(monkeypatch):
    """batchssl.data.load_split serves fake_split: the pretraining images (in_memory_pretrain_images) and the
    monitor's bank and queries (eval_datasets) both come through it. Returns the splits asked for."""
    asked = []

    def load_split(cfg, split):
        asked.append(split)
        return fake_split(cfg, split)

    monkeypatch.setattr(data, "load_split", load_split)
    return asked


def test_final_lr_ratio_and_momentum_final_move_the_schedules_ends(tmp_path, fake_fashion_mnist, own_process_state):
    from batchssl.train import train

    cfg = load_config(
        REPO / "recipes" / "fashion_mnist" / "mocov3_bf.yaml",
        [
            *SHRUNK,
            "optim.final_lr_ratio=0.5",
            "optim.warmup_epochs=0",
            "method.momentum_final=0.995",
            "monitor.enabled=false",
            f"output_dir={tmp_path}",
        ],
    )
    train(cfg)
    steps = [m for m in read_metrics(tmp_path) if "loss" in m]
    lrs, momenta = [m["lr"] for m in steps], [m["momentum"] for m in steps]
    peak, m0 = peak_lr(cfg), cfg.method.momentum
    # 4 steps, no warmup: the half cosine from peak to peak / 2, peak * (0.5 + 0.25 (1 + cos(pi t / 4))), t = 0..3.
    assert lrs == pytest.approx([peak * (0.5 + 0.25 * (1 + math.cos(math.pi * t / 4))) for t in range(4)])
    assert lrs[-1] > peak / 2
    # MoCo's momentum rises from m0 towards 0.995, not 1 (logged as float32).
    assert m0 == 0.99
    assert momenta == pytest.approx(
        [0.995 - (0.995 - m0) * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(4)], abs=1e-6
    )


def test_train_in_process_writes_the_run_directory(tmp_path, fake_fashion_mnist, own_process_state):
    from batchssl.train import train

    run = tmp_path / "run"
    # The default recipe (MoCo v3 + BatchFormer), SHRUNK. Checkpoints and the kNN monitor every epoch as in
    # the recipe; keep_last=1 so the older checkpoint must be pruned. Loader workers stay the recipe's (the
    # monitor extracts its features through them).
    cfg = load_config(
        REPO / "recipes" / "fashion_mnist" / "mocov3_bf.yaml",
        [*SHRUNK, "checkpoint.keep_last=1", "monitor.k=20", "monitor.batch_size=16", f"output_dir={run}"],
    )
    assert cfg.data.num_workers >= 1 and cfg.checkpoint.every_n_epochs == cfg.monitor.every_n_epochs == 1

    last = train(cfg)
    assert {"pretrain", "train", "test"} <= set(fake_fashion_mnist)  # nothing was read from disk

    # metrics.jsonl: every step once, in order, with the schedule's lr and what MoCo v3 + BatchFormer log;
    # one kNN line after each epoch, at that epoch's last step.
    metrics = read_metrics(run)
    steps = [m for m in metrics if "loss" in m]
    assert [(m["epoch"], m["step"]) for m in steps] == [(1, 1), (1, 2), (2, 3), (2, 4)]
    peak, warmup = peak_lr(cfg), round(cfg.optim.warmup_epochs * 2)
    for m in steps:
        assert {"loss", "loss_main", "loss_bf", "momentum", "z_std", "lr", "images_per_s"} <= set(m)
        assert math.isfinite(m["loss"]) and m["loss"] == pytest.approx(m["loss_main"] + m["loss_bf"], rel=1e-5)
        # the recipe holds the peak after the warmup (optim.final_lr_ratio 1.0) and MoCo's momentum at 0.99
        assert m["lr"] == warmup_cosine(m["step"] - 1, 4, warmup, peak, end=peak * cfg.optim.final_lr_ratio)
        assert m["momentum"] == pytest.approx(cfg.method.momentum)
    assert [m["lr"] for m in steps][warmup:] == [peak] * (4 - warmup)
    knn = [m for m in metrics if "knn_top1" in m]
    assert [(m["epoch"], m["step"], m["knn_k"]) for m in knn] == [(1, 2, 20), (2, 4, 20)]
    assert [m for m in metrics if "loss" not in m and "knn_top1" not in m] == []
    assert last == {**steps[-1], **{k: v for k, v in knn[-1].items() if k not in ("epoch", "step")}}

    # The newest checkpoint only (keep_last=1), with the trainer's state.
    assert [p.name for p in complete_checkpoints(run)] == ["epoch_0002"]
    assert read_state(run / "checkpoints" / "epoch_0002") == {
        "epoch": 2,
        "step": 4,
        "model_signature": model_signature(cfg),
        "collapse_alarm": {"low_steps": 0, "fired": False},
    }  # a healthy run: its z_std near 1 / sqrt(d)
    assert not list((run / "checkpoints").glob(".tmp*"))

    # backbone.safetensors: exactly the backbone's keys (strict load), the weights of the last checkpoint.
    info = data.dataset_info(cfg.data)
    backbone, _ = build_backbone(cfg.model, info.in_channels, info.image_size)
    load_backbone(backbone, run / "backbone.safetensors")
    from safetensors.torch import load_file

    saved = load_file(str(run / "checkpoints" / "epoch_0002" / "model.safetensors"))
    exported = load_backbone_weights(run / "backbone.safetensors")
    assert exported.keys() == {k.removeprefix("backbone.") for k in saved if k.startswith("backbone.")}
    assert all(torch.equal(v, saved[f"backbone.{k}"]) for k, v in exported.items())

    # config.yaml is the config that ran; config_history.jsonl holds it once, as a fresh start.
    assert load_run_config(run) == cfg
    history = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["resumed_from"] is None and history[0]["config"] == to_dict(cfg)

    # The monitor's last number is the kNN score of the exported backbone, computed as the evaluator does.
    from batchssl.eval.frozen import FrozenSource, load_frozen
    from batchssl.eval.knn import KnnSettings, knn_evaluate, split_features

    frozen = load_frozen(FrozenSource(run=str(run)))
    settings = KnnSettings(ks=(20,), temperature=cfg.monitor.temperature, batch_size=16)
    scores = knn_evaluate(
        split_features(frozen.backbone, *frozen.eval_splits(), settings, frozen.accelerator, frozen.dtype),
        settings,
        frozen.info.num_classes,
    )
    assert (scores[20]["top1"], scores[20]["top5"]) == (knn[-1]["knn_top1"], knn[-1]["knn_top5"])


class StopAt(Callback):
    """Stops train() after a global step, as a kill would (the checkpoints written so far stay)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, step: int, logged: dict | None) -> None:
        if step == self.step:
            raise Stopped(step)


class Stopped(Exception):
    pass


def test_collapse_alarm_count_survives_a_resume(tmp_path, fake_fashion_mnist, own_process_state):
    """With the threshold at 2 / sqrt(d) every logged z_std of a healthy run counts as low, so the alarm fires at
    the 4th logged step (patience 4). A run stopped at step 3, after epoch 1's checkpoint (2 low steps counted),
    must fire at step 4 too once resumed: the count comes back with the checkpoint (it would fire at step 6 if it
    restarted from zero)."""
    from batchssl.train import train

    def config(out):
        return load_config(
            REPO / "recipes" / "fashion_mnist" / "mocov3_bf.yaml",
            [
                *SHRUNK,
                "train.epochs=3",
                "monitor.enabled=false",
                "monitor.collapse_fraction=2",
                "monitor.collapse_patience=4",
                "checkpoint.every_n_epochs=1",
                f"output_dir={out}",
            ],
        )

    def alarms(run):
        return [m["step"] for m in read_metrics(run) if m.get("collapse_alarm")]

    train(config(tmp_path / "straight"))
    assert alarms(tmp_path / "straight") == [4]

    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(Stopped):
        train(config(tmp_path / "resumed"), callbacks=[StopAt(3)])
    assert [p.name for p in complete_checkpoints(tmp_path / "resumed")] == ["epoch_0001"]
    assert read_state(tmp_path / "resumed" / "checkpoints" / "epoch_0001")["collapse_alarm"] == {
        "low_steps": 2,
        "fired": False,
    }
    AcceleratorState._reset_state(reset_partial_state=True)
    train(config(tmp_path / "resumed"))
    assert alarms(tmp_path / "resumed") == [4]
    assert step_losses(tmp_path / "resumed") == step_losses(tmp_path / "straight")
