"""batchssl.optim: the one LARS against lightly's and by hand, the one warmup + cosine schedule, apply_lr's keys;
batchssl.files: atomic writes."""

import copy
import math
import os
import stat

import pytest
import torch
from lightly.utils.lars import LARS as LightlyLARS
from torch import nn

from batchssl.config import MethodConfig, OptimConfig, load_config
from batchssl.files import atomic_write, temp_path
from batchssl.methods.momentum import moco_momentum
from batchssl.optim import LARS, apply_lr, scheduled_lr, warmup_cosine


def _groups(model: nn.Module) -> list[dict]:
    # The trainer's layout: weights with decay, norms and biases without (no trust ratio there).
    return [
        {"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 1e-4},
        {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0},
    ]


def test_lars_equals_lightly_on_the_trainer_groups():
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    theirs = copy.deepcopy(ours)
    opt_ours, opt_theirs = LARS(_groups(ours), lr=0.5, momentum=0.9), LightlyLARS(_groups(theirs), lr=0.5, momentum=0.9)
    x = torch.randn(32, 8)
    for _ in range(5):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.manual_seed(0)
    assert not torch.equal(ours[0].weight, nn.Linear(8, 16).weight)  # it did train


def test_lars_trust_ratio_by_hand_with_and_without_decay():
    def step(wd: float, trust_without_decay: bool) -> torch.Tensor:
        weight = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
        weight.grad = torch.tensor([[0.6, 0.8]])  # norm 1
        LARS([weight], lr=1.0, momentum=0.0, weight_decay=wd, trust_without_decay=trust_without_decay).step()
        return weight.detach()

    # wd 0, no trust ratio: plain SGD (MoCo v3's exclusion of biases and norms).
    torch.testing.assert_close(step(0.0, False), torch.tensor([[2.4, 3.2]]))
    # wd 0 with trust_without_decay (SimSiam's probe): update scaled by 0.001 * 5 / 1.
    torch.testing.assert_close(step(0.0, True), torch.tensor([[3.0 - 0.003, 4.0 - 0.004]]))
    # wd 0.1: (g + 0.1 p) * 0.001 * 5 / (1 + 0.1 * 5) = (0.9, 1.2) * 0.001 * 5 / 1.5
    torch.testing.assert_close(step(0.1, False), torch.tensor([[3.0 - 0.003, 4.0 - 0.004]]))


def test_warmup_cosine_values():
    assert warmup_cosine(0, 100, 10, 2.0) == pytest.approx(0.2)  # first warmup step
    assert warmup_cosine(9, 100, 10, 2.0) == pytest.approx(2.0)  # warmup ends at the peak
    assert warmup_cosine(10, 100, 10, 2.0) == pytest.approx(2.0)
    assert warmup_cosine(55, 100, 10, 2.0) == pytest.approx(1.0)  # half way through the cosine
    assert warmup_cosine(100, 100, 10, 2.0) == pytest.approx(0.0)
    assert warmup_cosine(25, 100, 0, 1.0, end=3.0) == pytest.approx(3.0 - 2.0 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_scheduled_lr_decays_to_the_final_ratio():
    cfg = load_config(None, ["optim.base_lr=0.4", "train.batch_size=512", "optim.final_lr_ratio=0.25"])
    peak = 0.4 * 512 / 256
    assert scheduled_lr(cfg, 0, 100, 10) == pytest.approx(peak / 10)
    assert scheduled_lr(cfg, 10, 100, 10) == pytest.approx(peak)
    assert scheduled_lr(cfg, 55, 100, 10) == pytest.approx(peak * (0.25 + 0.75 / 2))  # half way down the cosine
    assert scheduled_lr(cfg, 100, 100, 10) == pytest.approx(peak * 0.25)
    # Ratio 0 is the papers' decay to zero, and the library's default where a recipe says nothing ...
    assert scheduled_lr(load_config(None, ["optim.final_lr_ratio=0"]), 100, 100, 10) == 0.0
    assert OptimConfig().final_lr_ratio == 0.0 and MethodConfig().momentum_final == 1.0
    # ... and the default recipe holds its peak after the warmup (chosen on the held-out split, BENCHMARKS.md).
    default = load_config(None, [])
    assert scheduled_lr(default, 100, 100, 10) == scheduled_lr(default, 10, 100, 10) == default.optim.base_lr


def test_moco_momentum_is_the_papers_formula():
    for t in (0, 1, 37, 99, 100):
        expected = 1 - (1 - 0.99) * (math.cos(math.pi * t / 100) + 1) / 2
        assert moco_momentum(t, 100, 0.99) == pytest.approx(expected)
        # method.momentum_final: the same half cosine ending at 0.996 instead of 1; at m0 it is a constant.
        assert moco_momentum(t, 100, 0.99, 0.996) == pytest.approx(
            0.996 - (0.996 - 0.99) * (math.cos(math.pi * t / 100) + 1) / 2
        )
        assert moco_momentum(t, 100, 0.99, 0.99) == pytest.approx(0.99)


def test_apply_lr_honours_lr_scale_and_fixed_lr():
    params = [nn.Parameter(torch.zeros(1)) for _ in range(3)]
    opt = torch.optim.SGD(
        [{"params": [params[0]]}, {"params": [params[1]], "lr_scale": 0.1}, {"params": [params[2]], "fixed_lr": True}],
        lr=0.0,
    )
    apply_lr(opt, lr=0.5, peak=2.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.05, 2.0])


def test_atomic_write_replaces_whole_files_readable_by_all(tmp_path):
    path = tmp_path / "sub" / "result.json"
    atomic_write(path, "first")
    atomic_write(path, b"second")
    atomic_write(path, lambda tmp: tmp.write_text("third"))
    assert path.read_text() == "third" and not temp_path(path).exists()
    umask = os.umask(0o022)
    try:
        atomic_write(path, lambda tmp: os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600)))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # a writer that creates 0600 still gives 0644
