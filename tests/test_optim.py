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
from helpers import REPO, own_process_state


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


# ------------------------------------------- Barlow Twins' bias lr, DINO's weight-decay schedule and clipping


def test_bias_lr_ratio_of_the_barlow_twins_recipe_scales_biases_and_norms_only():
    from batchssl.config import BatchFormerConfig
    from batchssl.methods import METHODS

    cfg = load_config(REPO / "recipes" / "imagenet" / "barlowtwins_bf.yaml")
    assert cfg.optim.bias_lr_ratio == pytest.approx(0.0048 / 0.2)  # the official code's two lrs
    head = MethodConfig(name="barlowtwins", proj_hidden_dim=16, proj_dim=16, proj_layers=3)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8))
    method = METHODS["barlowtwins"](backbone, 8, head, BatchFormerConfig(enabled=True, dropout=0.0, lr_scale=0.5))
    opt = torch.optim.SGD(method.parameter_groups(cfg.optim), lr=0.0)
    apply_lr(opt, lr=1.6, peak=1.6)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    ratio = cfg.optim.bias_lr_ratio
    for name, part, scale in (("backbone", method.backbone, 1.0), ("batchformer", method.batchformer, 0.5)):
        for pname, p in part.named_parameters():
            expected = 1.6 * scale * (1.0 if p.ndim > 1 else ratio)
            assert lr_of[id(p)] == pytest.approx(expected), (name, pname)
    # Biases and norms: no decay; weights: the recipe's decay.
    for g in opt.param_groups:
        assert g["weight_decay"] == (cfg.optim.weight_decay if g["decays"] else 0.0)
        assert g["decays"] == all(p.ndim > 1 for p in g["params"])


def test_weight_decay_schedule_is_dinos_cosine_on_the_weights_only():
    from batchssl.build import Schedule
    from batchssl.optim import scheduled_weight_decay

    cfg = load_config(None, ["optim.weight_decay=0.04", "optim.weight_decay_end=0.4", "optim.warmup_epochs=2"])
    # DINO's cosine_scheduler(0.04, 0.4, epochs, steps): no warmup, start at 0.04, half way 0.22, end at 0.4.
    assert scheduled_weight_decay(cfg.optim, 0, 100) == pytest.approx(0.04)
    assert scheduled_weight_decay(cfg.optim, 50, 100) == pytest.approx(0.22)
    assert scheduled_weight_decay(cfg.optim, 25, 100) == pytest.approx(
        0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi / 4))
    )
    assert scheduled_weight_decay(cfg.optim, 100, 100) == pytest.approx(0.4)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    groups = _groups(model)
    groups[0]["decays"] = True
    opt = torch.optim.AdamW(groups, lr=0.0)
    schedule = Schedule(cfg, total_steps=100, warmup_steps=20)
    for step, expected in ((0, 0.04), (50, 0.22), (100, 0.4)):
        lr = schedule.apply(opt, step)
        assert lr == schedule.lr(step)  # the lr schedule (with its warmup) is untouched
        assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx([expected, 0.0])
    constant = Schedule(load_config(None, ["optim.weight_decay=0.1"]), total_steps=100, warmup_steps=0)
    constant.apply(opt, 50)  # weight_decay_end null: the groups keep what they had
    assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx([0.4, 0.0])


def test_per_tensor_clipping_is_dinos_clip_gradients_by_hand():
    from batchssl.optim import clip_grad_norm_per_tensor_

    big, small, none = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    big.grad, small.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])
    clip_grad_norm_per_tensor_([big, small, none], max_norm=1.0)
    # |g| = 5 > 1: scaled by 1 / (5 + 1e-6); |g| = 0.5 <= 1: unchanged (a global clip would scale both by 1/5.02).
    torch.testing.assert_close(big.grad, torch.tensor([3.0, 4.0]) / (5 + 1e-6))
    torch.testing.assert_close(small.grad, torch.tensor([0.3, 0.4]))
    assert none.grad is None


@pytest.mark.parametrize("mode", ["per_tensor", "global"])
def test_train_step_clips_as_the_dino_recipe_says(mode):
    """train_step with the ImageNet DINO recipe's train settings (max_grad_norm 3.0, per tensor): with plain SGD at
    lr 1 each parameter moves by its clipped gradient, so every tensor's step is at most 3.0 and, per tensor, the
    larger ones are exactly 3.0; the global mode bounds only the norm over all of them."""
    from accelerate import Accelerator

    from batchssl.train import train_step

    train = load_config(REPO / "recipes" / "imagenet" / "dino.yaml").train
    assert (train.max_grad_norm, train.max_grad_norm_mode) == (3.0, "per_tensor")
    train.max_grad_norm_mode = mode

    class Loss(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4))

        def forward(self, views, step, total):
            return {"loss": (self.a * views[0]).sum() + (self.b * views[1]).sum()}

    model = Loss()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    views = [torch.full((4,), 10.0), torch.full((4,), 0.1)]  # gradient norms 20 and 0.2
    with own_process_state():  # Accelerate's process-wide state made here is reset for the tests after
        train_step(model, opt, Accelerator(cpu=True), views, 0, 1, train)
    moved = [torch.linalg.vector_norm(p).item() for p in (model.a, model.b)]
    if mode == "per_tensor":
        assert moved == pytest.approx([3.0, 0.2], rel=1e-5)
    else:
        assert math.hypot(*moved) == pytest.approx(3.0, rel=1e-5) and moved[1] == pytest.approx(
            0.2 * 3 / 20.001, rel=1e-3
        )


def test_plan_states_the_weight_decay_and_bias_lr_as_the_groups_get_them():
    from batchssl.plan import _weight_decay

    dino = load_config(None, ["optim.weight_decay=0.04", "optim.weight_decay_end=0.4"]).optim
    assert _weight_decay(dino) == "cosine 0.04 -> 0.4 on weights; biases and norms none"
    barlow = load_config(REPO / "recipes" / "imagenet" / "barlowtwins.yaml").optim
    assert _weight_decay(barlow) == "1.5e-06 on weights; biases and norms none, at 0.024 x the lr"
