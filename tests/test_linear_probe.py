"""batchssl.eval.linear_cached / linear_augmented: the cached grid, the augmented protocol, its frozen-backbone
check, resume, two processes."""

from pathlib import Path

import pytest
import torch
from torch import nn

from batchssl.errors import UserError
from batchssl.eval.linear_augmented import (
    CHECKPOINT_NAME,
    BackboneChangedError,
    check_backbone_unchanged,
    state_fingerprint,
    train_augmented_probe,
)
from batchssl.eval.linear_cached import CachedProbeSettings, topk_accuracy, train_cached_probes, train_val_split
from batchssl.optim import LARS
from helpers import probe_2proc as helper
from helpers import run_entry

HELPER = Path(helper.__file__)  # also run under torchrun, by path


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    # row 0: right at top-1; row 1: second; row 2: last of 3 -> top-5 of 3 classes counts it (k clipped).
    assert topk_accuracy(logits, labels, ks=(1, 2, 5)) == pytest.approx({1: 100 / 3, 2: 200 / 3, 5: 100.0})


def test_train_val_split_is_stratified_and_disjoint():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    train, val = train_val_split(labels, val_fraction=0.1, seed=0)
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))
    assert torch.bincount(labels[val]).tolist() == [5, 3, 2]


def blobs(n, num_classes=5, dim=32, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123))
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return centers[labels] + spread * torch.randn(n, dim, generator=g) + 5.0, labels  # offset: standardising matters


def test_cached_probes_separate_blobs_and_skip_diverged_heads():
    x, y = blobs(1500)
    tx, ty = blobs(500, seed=1)
    train, val = train_val_split(y, 0.2)
    result = train_cached_probes(
        x[train],
        y[train],
        x[val],
        y[val],
        tx,
        ty,
        num_classes=5,
        settings=CachedProbeSettings(lrs=(float("inf"), 0.01, 0.1), epochs=10, batch_size=128),
    )
    assert result["test_top1"] >= 99.0 and result["test_top5"] == 100.0
    assert result["grid"][0]["val_top1"] == -1.0  # the inf-lr head diverged and is marked, never chosen
    assert result["lr"] in (0.01, 0.1)


def test_cached_probes_choose_on_val_never_on_test():
    # Overlapping classes, so the lrs really differ in accuracy.
    x, y = blobs(1200, spread=3.0)
    tx, ty = blobs(400, seed=1, spread=3.0)
    train, val = train_val_split(y, 0.25)
    common = dict(
        num_classes=5,
        settings=CachedProbeSettings(
            lrs=(1e-4, 1e-3, 1e-2, 1e-1, 1.0), weight_decays=(0.0, 1e-2), epochs=5, batch_size=64
        ),
    )
    result = train_cached_probes(x[train], y[train], x[val], y[val], tx, ty, **common)
    grid_val = [g["val_top1"] for g in result["grid"]]
    assert len(grid_val) == 10 and len(set(grid_val)) > 1
    best = result["grid"][grid_val.index(max(grid_val))]
    assert (result["lr"], result["weight_decay"], result["val_top1"]) == (
        best["lr"],
        best["weight_decay"],
        max(grid_val),
    )
    # Scrambled test labels change the test score but not the choice: the test split plays no part in it.
    scrambled = train_cached_probes(x[train], y[train], x[val], y[val], tx, (ty + 1) % 5, **common)
    assert scrambled["grid"] == result["grid"] and scrambled["lr"] == result["lr"]
    assert scrambled["test_top1"] != result["test_top1"]


def test_lars_step_by_hand():
    weight = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    bias = nn.Parameter(torch.tensor([1.0]))
    weight.grad, bias.grad = torch.tensor([[0.6, 0.8]]), torch.tensor([0.5])  # gradient norm 1
    LARS([weight, bias], lr=1.0, momentum=0.0, trust_coefficient=0.001, trust_without_decay=True).step()
    # weight: update scaled by 0.001 * 5 / 1 (even with weight decay 0); bias: 1-D, plain SGD.
    torch.testing.assert_close(weight.data, torch.tensor([[3.0 - 0.003, 4.0 - 0.004]]))
    torch.testing.assert_close(bias.data, torch.tensor([0.5]))


def test_augmented_probe_runs_and_leaves_backbone_as_it_was():
    backbone, train_set, test_set = helper.build()
    backbone.train()
    before = state_fingerprint(backbone)
    result = train_augmented_probe(backbone, train_set, test_set, settings=helper.settings(), **helper.PROBE)
    assert set(result) == {"top1", "top5", "lr", "epochs", "train_loss"}
    assert result["lr"] == 16.0 * 16 / 256 and result["epochs"] == 2
    assert 0 <= result["top1"] <= result["top5"] == 100.0  # 4 classes: top-5 is top-4
    assert result["top1"] > 50.0  # the colour cue is easy; chance is 25 %
    assert state_fingerprint(backbone) == before
    assert backbone.training and all(p.requires_grad for p in backbone.parameters())


def test_augmented_probe_standardises_with_training_feature_statistics(tmp_path):
    backbone, train_set, test_set = helper.build()
    train_augmented_probe(
        backbone, train_set, test_set, checkpoint_dir=tmp_path, settings=helper.settings(epochs=1), **helper.PROBE
    )
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    backbone.eval()  # 64 training images: all of them fix the statistics, through the backbone in eval mode
    with torch.no_grad():
        feats = backbone(train_set.tensors[0]).flatten(1)
    torch.testing.assert_close(state["feature_mean"], feats.mean(0))
    torch.testing.assert_close(state["feature_inv_std"], torch.rsqrt(feats.var(0, unbiased=False) + 1e-6))

    train_augmented_probe(
        backbone,
        train_set,
        test_set,
        checkpoint_dir=tmp_path / "raw",
        settings=helper.settings(epochs=1, standardize=False),
        **helper.PROBE,
    )
    raw = torch.load(tmp_path / "raw" / CHECKPOINT_NAME, weights_only=True)
    assert torch.equal(raw["feature_mean"], torch.zeros(helper.FEATURE_DIM))
    assert torch.equal(raw["feature_inv_std"], torch.ones(helper.FEATURE_DIM))


def test_lars_probe_scales_every_weight_step_by_the_trust_ratio(tmp_path):
    """optimizer="lars" (SimSiam's probe, weight decay 0): each step moves the head's weight matrix by
    trust_coefficient (0.001) x lr x its norm, where plain SGD at this lr rewrites it. LARS needs thousands of such
    steps to learn, so a few steps show the update it makes, not an accuracy."""

    def head_weight(name, **changes):
        backbone, train_set, test_set = helper.build()
        result = train_augmented_probe(
            backbone,
            train_set,
            test_set,
            checkpoint_dir=tmp_path / name,
            settings=helper.settings(epochs=1, **changes),
            **helper.PROBE,
        )
        return result, torch.load(tmp_path / name / CHECKPOINT_NAME, weights_only=True)["head"]["weight"]

    _, initial = head_weight("untrained", base_lr=1e-30)  # the same seeded initial head, never moved
    result, trained = head_weight("lars", optimizer="lars")
    assert result["lr"] == 1.0 and result["epochs"] == 1
    moved = ((trained - initial).norm() / initial.norm()).item()
    # 4 steps at lr <= 1, momentum 0.9: the first moves it by exactly 0.001 of its norm, none by more than
    # 0.001 / (1 - 0.9); plain SGD would move it by more than its own norm.
    assert 0.001 * 0.5 < moved <= 4 * 0.001 / (1 - 0.9)


def test_backbone_changed_during_probe_raises():
    backbone, train_set, test_set = helper.build()

    def leak(module, inputs, output):  # a forward that writes into the weights, as a buggy backbone could
        with torch.no_grad():
            module.weight.add_(1e-3)

    backbone[0].register_forward_hook(leak)
    with pytest.raises(BackboneChangedError, match=r"0\.weight"):
        train_augmented_probe(backbone, train_set, test_set, settings=helper.settings(epochs=1), **helper.PROBE)


def test_check_backbone_unchanged_sees_buffers():
    backbone, _, _ = helper.build()
    fingerprint = state_fingerprint(backbone)
    check_backbone_unchanged(backbone, fingerprint)
    backbone[1].running_mean[0] += 1.0  # e.g. BatchNorm left in train mode
    with pytest.raises(BackboneChangedError, match="running_mean"):
        check_backbone_unchanged(backbone, fingerprint)


class Interrupt(Exception):
    pass


def test_resume_from_epoch_checkpoint_equals_uninterrupted_run(tmp_path):
    backbone, train_set, test_set = helper.build()
    straight = train_augmented_probe(
        backbone, train_set, test_set, checkpoint_dir=tmp_path / "a", settings=helper.settings(), **helper.PROBE
    )

    # Second run: killed in its second epoch (the first epoch's checkpoint is on disk), then resumed.
    forwards = 0

    def interrupt(module, inputs, output):
        nonlocal forwards
        forwards += 1
        if forwards == 4 + 6:  # 4 batches of feature statistics, then 64 images / batch 16 = 4 steps per epoch
            raise Interrupt

    handle = backbone.register_forward_hook(interrupt)
    with pytest.raises(Interrupt):
        train_augmented_probe(
            backbone, train_set, test_set, checkpoint_dir=tmp_path / "b", settings=helper.settings(), **helper.PROBE
        )
    handle.remove()
    assert torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=True)["epoch"] == 1
    resumed = train_augmented_probe(
        backbone, train_set, test_set, checkpoint_dir=tmp_path / "b", settings=helper.settings(), **helper.PROBE
    )

    a = torch.load(tmp_path / "a" / CHECKPOINT_NAME, weights_only=True)
    b = torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for name in a["head"]:
        assert torch.equal(a["head"][name], b["head"][name]), name
    assert resumed["top1"] == straight["top1"] and resumed["train_loss"] == straight["train_loss"]
    assert not list((tmp_path / "b").glob("*.tmp"))

    with pytest.raises(UserError, match="base_lr"):  # other settings: refuse rather than mix two runs
        train_augmented_probe(
            backbone,
            train_set,
            test_set,
            checkpoint_dir=tmp_path / "b",
            settings=helper.settings(base_lr=0.1),
            **helper.PROBE,
        )
    with torch.no_grad():
        backbone[0].bias.add_(1.0)
    with pytest.raises(UserError, match="another backbone"):
        train_augmented_probe(
            backbone, train_set, test_set, checkpoint_dir=tmp_path / "b", settings=helper.settings(), **helper.PROBE
        )


def test_two_processes_match_one(tmp_path):
    run_entry(HELPER, tmp_path, launcher="torchrun", timeout=180)
    two = torch.load(tmp_path / "result.pt", weights_only=True)
    two_head = torch.load(tmp_path / "ckpt" / CHECKPOINT_NAME, weights_only=True)["head"]

    # Each process takes half of every global batch and DDP averages the gradients: the same steps as one
    # process with the whole batch, up to float summation order.
    backbone, train_set, test_set = helper.build()
    one = train_augmented_probe(
        backbone, train_set, test_set, checkpoint_dir=tmp_path / "one", settings=helper.settings(), **helper.PROBE
    )
    one_head = torch.load(tmp_path / "one" / CHECKPOINT_NAME, weights_only=True)["head"]
    for name in one_head:
        torch.testing.assert_close(two_head[name], one_head[name], rtol=1e-4, atol=1e-6)
    assert two["top1"] == one["top1"] and two["top5"] == one["top5"]
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
