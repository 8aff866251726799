"""The online linear probe: learns, skips unlabelled rows, never touches the backbone or torch's global RNG,
and resumes exactly from its state_dict."""

import io
import textwrap

import pytest
import torch
from torch import nn

from batchssl.online_linear import OnlineLinear, feature_tap, gather_rows
from helpers import run_entry


def toy(n: int, dim: int = 16, classes: int = 4, seed: int = 0, scale: float = 30.0):
    """Linearly separable classes: class means far apart, features on a large, shifted scale (standardisation
    must cope with it)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g) * 3
    y = torch.randint(0, classes, (n,), generator=g)
    x = (means[y] + 0.3 * torch.randn(n, dim, generator=g)) * scale + 100.0
    return x, y


def train(probe: OnlineLinear, x, y, steps: int, batch: int = 64, start: int = 0, total: int | None = None):
    losses = []
    for step in range(start, start + steps):
        i = (step * batch) % len(x)
        losses.append(probe.train_step(x[i : i + batch], y[i : i + batch], step, total or start + steps))
    return losses


def test_learns_a_separable_toy_problem():
    x, y = toy(2048)
    xv, yv = toy(1024, seed=0)
    xv, yv = xv[512:], yv[512:]  # same class means (same seed), other samples
    probe = OnlineLinear(16, 4)
    losses = train(probe, x, y, steps=200)
    assert losses[-1] < losses[0]
    result = probe.evaluate(xv, yv)
    assert set(result) == {"online_top1", "online_top5"}
    assert result["online_top1"] > 95.0
    assert result["online_top5"] == 100.0  # 4 classes: top-5 is top-4


def test_loss_is_a_detached_scalar_and_bf16_features_work():
    x, y = toy(64)
    probe = OnlineLinear(16, 4)
    loss = probe.train_step(x.bfloat16(), y, 0, 10)
    assert loss.dim() == 0 and not loss.requires_grad and loss.dtype == torch.float32


def test_unlabelled_rows_are_skipped():
    x, y = toy(128)
    probe = OnlineLinear(16, 4)
    train(probe, x, y, steps=3)
    before = {k: v.clone() for k, v in probe.state_dict().items() if torch.is_tensor(v)}
    momentum = [probe.optimizer.state[p]["momentum_buffer"].clone() for p in probe.linear.parameters()]
    # A batch of only unlabelled rows changes nothing: no step, no statistics, no momentum.
    assert probe.train_step(x[:64], torch.full((64,), -1), 3, 10) is None
    after = {k: v for k, v in probe.state_dict().items() if torch.is_tensor(v)}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(
        torch.equal(m, probe.optimizer.state[p]["momentum_buffer"]) for m, p in zip(momentum, probe.linear.parameters())
    )


def test_mixed_batch_equals_its_labelled_rows():
    x, y = toy(64)
    y_mixed = y.clone()
    y_mixed[::2] = -1
    a, b = OnlineLinear(16, 4), OnlineLinear(16, 4)
    la = a.train_step(x, y_mixed, 0, 10)
    lb = b.train_step(x[1::2], y[1::2], 0, 10)
    assert torch.equal(la, lb)
    assert all(
        torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()) if torch.is_tensor(p)
    )


def test_single_labelled_row_uses_running_statistics():
    x, y = toy(8)
    y[1:] = -1
    probe = OnlineLinear(16, 4)
    assert probe.train_step(x, y, 0, 10) is not None
    assert probe.norm.num_batches_tracked.item() == 0


def test_backbone_gradients_untouched():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
    images, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    features = backbone(images)  # not detached: the probe must detach
    probe = OnlineLinear(16, 4)
    probe.train_step(features, y, 0, 10)
    assert all(p.grad is None for p in backbone.parameters())
    assert features.grad_fn is not None  # the caller's graph is intact for its own loss


def test_feature_tap_collects_detached_outputs_in_call_order():
    backbone = nn.Linear(8, 4)
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    with feature_tap(backbone) as taps:
        out_a, out_b = backbone(a), backbone(b)
    backbone(a)  # after the block: not collected
    assert len(taps) == 2
    assert torch.equal(torch.cat(taps), torch.cat([out_a, out_b]).detach())
    assert not taps[0].requires_grad


def test_no_global_random_numbers():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    x, y = toy(256)  # own generator
    probe = OnlineLinear(16, 4, seed=7)
    train(probe, x, y, steps=5)
    probe.evaluate(x, y)
    assert torch.equal(torch.get_rng_state(), state)


def test_construction_is_seeded():
    a, b, c = OnlineLinear(16, 4, seed=1), OnlineLinear(16, 4, seed=1), OnlineLinear(16, 4, seed=2)
    assert torch.equal(a.linear.weight, b.linear.weight)
    assert not torch.equal(a.linear.weight, c.linear.weight)


def test_state_round_trip_gives_identical_next_steps():
    x, y = toy(1024)
    a = OnlineLinear(16, 4)
    train(a, x, y, steps=10, total=20)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)  # momentum buffers included, loadable without unpickling objects
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    b = OnlineLinear(16, 4, seed=99)  # other init: everything must come from the state
    b.load_state_dict(state)
    assert b.optimizer.state_dict()["state"]  # momentum restored
    la = train(a, x, y, steps=10, start=10, total=20)
    lb = train(b, x, y, steps=10, start=10, total=20)
    assert all(torch.equal(p, q) for p, q in zip(la, lb))
    assert torch.equal(a.linear.weight, b.linear.weight)
    assert torch.equal(a.norm.running_var, b.norm.running_var)


def test_lr_follows_its_own_cosine():
    x, y = toy(64)
    probe = OnlineLinear(16, 4, lr=0.1)
    probe.train_step(x, y, 0, 100)
    assert probe.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    probe.train_step(x, y, 50, 100)
    assert probe.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_gather_rows_on_one_process_is_identity():
    f, y = torch.randn(4, 3, requires_grad=True), torch.tensor([0, 1, -1, 2])
    gf, gy = gather_rows(f, y)
    assert torch.equal(gf, f.detach()) and not gf.requires_grad and torch.equal(gy, y)


TWO_PROCESSES = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from batchssl.online_linear import OnlineLinear, gather_rows

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 32, 16, generator=g), torch.randint(-1, 4, (8, 32), generator=g)
    probe = OnlineLinear(16, 4)
    for step in range(8):  # each process holds its half of the step's rows
        local = slice(16 * rank, 16 * (rank + 1))
        probe.train_step(*gather_rows(x[step, local], y[step, local]), step, 8)
    single = OnlineLinear(16, 4)
    for step in range(8):
        single.train_step(x[step], y[step], step, 8)
    if rank == 0:
        torch.save({"two": probe.state_dict(), "one": single.state_dict()}, sys.argv[1])
    else:
        torch.save({"two": probe.state_dict()}, sys.argv[2])
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_gathered_rows_keep_the_copies_equal_on_two_processes(tmp_path):
    script = tmp_path / "probe_2proc.py"
    script.write_text(TWO_PROCESSES)
    run_entry(script, tmp_path / "r0.pt", tmp_path / "r1.pt", launcher="torchrun", timeout=240)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in (0, 1))
    for key, value in r0["two"].items():
        if torch.is_tensor(value):
            assert torch.equal(value, r1["two"][key]), key  # the two copies are bit-equal
            assert torch.allclose(value.float(), r0["one"][key].float(), atol=1e-5), key  # = one process, full batch
