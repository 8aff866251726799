"""The losses against values computed by hand from the papers' formulas."""

import math

import pytest
import torch

import batchssl.methods.mocov3 as mocov3
from batchssl.config import BatchFormerConfig, MethodConfig
from batchssl.methods.mocov3 import MoCoV3, contrastive_loss
from batchssl.methods.momentum import moco_momentum
from batchssl.methods.simsiam import SimSiam


def tiny_backbone():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8))


def test_simsiam_symmetric_negative_cosine_by_hand():
    method = SimSiam(
        tiny_backbone(), 8, MethodConfig(proj_hidden_dim=8, proj_dim=2, pred_hidden_dim=4), BatchFormerConfig()
    )
    p1, z2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])  # cos = 1/sqrt(2)
    p2, z1 = torch.tensor([[0.0, 1.0]]), torch.tensor([[3.0, 0.0]])  # cos = 0
    loss = method.loss([p1, p2], [z1, z2])
    assert loss.item() == pytest.approx(0.5 * (-1 / math.sqrt(2)) + 0.5 * 0.0, abs=1e-7)


def test_simsiam_targets_are_stop_gradient():
    method = SimSiam(
        tiny_backbone(), 8, MethodConfig(proj_hidden_dim=8, proj_dim=2, pred_hidden_dim=4), BatchFormerConfig()
    )
    p1, p2 = torch.randn(3, 2, requires_grad=True), torch.randn(3, 2, requires_grad=True)
    z1, z2 = torch.randn(3, 2, requires_grad=True), torch.randn(3, 2, requires_grad=True)
    method.loss([p1, p2], [z1, z2]).backward()
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0
    assert z1.grad is None and z2.grad is None


def test_moco_contrastive_loss_by_hand_with_two_tau():
    tau = 0.5
    q = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # normalised inside: e1, e2
    k = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    # logits = I / tau; CE per row = log(1 + e^{-1/tau}); times 2 tau.
    expected = math.log(1 + math.exp(-1 / tau)) * 2 * tau
    assert contrastive_loss(q, k, tau).item() == pytest.approx(expected, rel=1e-6)


def test_moco_labels_are_offset_by_rank(monkeypatch):
    """Rank 1 of 2: its positives sit at columns N..2N-1 of the gathered keys."""
    tau = 1.0
    other_keys = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # rank 0's keys, all along e1
    local_k = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # rank 1's keys, along e2
    q = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # queries match the local keys
    monkeypatch.setattr(mocov3, "rank", lambda: 1)
    monkeypatch.setattr(mocov3, "all_gather_no_grad", lambda k: torch.cat([other_keys, k]))
    # each row's logits: [0, 0, 1, 1]; positive at column 2 + i -> CE = -log(e / (2 + 2e)).
    expected = -math.log(math.e / (2 + 2 * math.e)) * 2 * tau
    assert contrastive_loss(q, local_k, tau).item() == pytest.approx(expected, rel=1e-6)
    # The same keys on rank 0: the positives are columns 0..N-1 (rank 0's keys, logit 0), a larger loss, so the
    # offset decides the value above.
    monkeypatch.setattr(mocov3, "rank", lambda: 0)
    without_offset = -math.log(1 / (2 + 2 * math.e)) * 2 * tau
    assert contrastive_loss(q, local_k, tau).item() == pytest.approx(without_offset, rel=1e-6)
    assert without_offset > expected


def test_moco_momentum_schedule():
    assert moco_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert moco_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert moco_momentum(100, 100, 0.99) == pytest.approx(1.0)


def test_moco_forward_is_the_symmetric_loss_and_updates_the_momentum_encoder():
    torch.manual_seed(0)
    cfg = MethodConfig(name="mocov3", proj_hidden_dim=16, proj_dim=8, proj_layers=2, temperature=0.2, momentum=0.9)
    method = MoCoV3(tiny_backbone(), 8, cfg, BatchFormerConfig())
    views = [torch.randn(6, 12), torch.randn(6, 12)]
    with torch.no_grad():  # move the online encoder away from its copy so the EMA is visible
        for p in method.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in method.backbone_momentum.parameters()]
    out = method(views, step=0, total_steps=10)
    for old, new, online in zip(before, method.backbone_momentum.parameters(), method.backbone.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * online)
    assert out["momentum"].item() == pytest.approx(0.9)
    with torch.no_grad():
        q1, q2 = (method.predictor(method.projector(method.backbone(x))) for x in views)
        k1, k2 = (method.projector_momentum(method.backbone_momentum(x)) for x in views)
    # Recompute ctr(q1, k2) + ctr(q2, k1) directly (BN in train mode, same batch: same statistics).
    expected = sum(
        torch.nn.functional.cross_entropy(
            torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(k, dim=1).T / 0.2, torch.arange(6)
        )
        * 0.4
        for q, k in ((q1, k2), (q2, k1))
    )
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_two_view_losses_are_the_papers_formulas_exactly():
    """The list form (cross_view_loss) gives the two-view formulas bit for bit: the recipes' losses unchanged."""
    torch.manual_seed(0)
    q1, q2, k1, k2 = (torch.randn(5, 4) for _ in range(4))
    moco = MoCoV3(
        tiny_backbone(),
        8,
        MethodConfig(name="mocov3", proj_hidden_dim=8, proj_dim=4, temperature=0.2),
        BatchFormerConfig(),
    )
    expected = contrastive_loss(q1, k2, 0.2) + contrastive_loss(q2, k1, 0.2)
    assert torch.equal(moco.loss([q1, q2], [k1, k2]), expected)
    simsiam = SimSiam(
        tiny_backbone(), 8, MethodConfig(proj_hidden_dim=8, proj_dim=4, pred_hidden_dim=4), BatchFormerConfig()
    )
    cos = torch.nn.functional.cosine_similarity
    expected = 0.5 * (-cos(q1, k2).mean() - cos(q2, k1).mean())
    assert torch.equal(simsiam.loss([q1, q2], [k1, k2]), expected)
    # Local crops: every query against the global keys but its own, 2 x the mean over those pairs.
    q3 = torch.randn(5, 4)
    pairs = [(q1, k2), (q2, k1), (q3, k1), (q3, k2)]
    expected = 2 * sum(contrastive_loss(q, k, 0.2) for q, k in pairs) / 4
    torch.testing.assert_close(moco.loss([q1, q2, q3], [k1, k2]), expected, rtol=1e-6, atol=0)
