"""BatchFormer semantics of docs/architecture.md: masking, scopes, gradients, training-only, absent from the export."""

import pytest
import torch

from batchssl.backbones import build_backbone
from batchssl.batchformer import BatchFormer, joint_mask, two_streams
from batchssl.checkpoint import export_backbone, load_backbone
from batchssl.config import BatchFormerConfig, MethodConfig, ModelConfig
from batchssl.methods.mocov3 import MoCoV3
from batchssl.methods.simsiam import SimSiam


def test_joint_mask_hides_exactly_the_own_other_view():
    mask = joint_mask(n=3, blocks=2, device=torch.device("cpu"))
    assert mask.shape == (12, 12) and mask.sum() == 12
    # process 0: rows 0..2 view 1, 3..5 view 2; process 1: rows 6..8, 9..11
    for i, j in [(0, 3), (3, 0), (2, 5), (6, 9), (11, 8)]:
        assert mask[i, j]
    assert not mask[0, 0] and not mask[0, 4] and not mask[0, 9]


def test_joint_mask_for_more_views_hides_every_own_other_view():
    n, views = 2, 4  # two global + two local crops, two processes
    mask = joint_mask(n=n, blocks=2, device=torch.device("cpu"), views=views)
    assert mask.shape == (16, 16) and mask.sum() == 16 * (views - 1)
    for i in range(16):
        block, view, sample = i // (views * n), (i // n) % views, i % n
        hidden = {block * views * n + v * n + sample for v in range(views) if v != view}
        assert set(torch.nonzero(mask[i]).view(-1).tolist()) == hidden


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_joint_output_does_not_depend_on_own_other_view(dropout):
    torch.manual_seed(0)
    bf = BatchFormer(8, BatchFormerConfig(enabled=True, dropout=dropout)).train()
    z1, z2 = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    out1, out2 = bf([z1, z2])
    (out1[2] * torch.randn(8)).sum().backward()  # a plain sum of a LayerNorm output has no gradient
    assert torch.equal(z2.grad[2], torch.zeros(8))  # exactly 0: the positive pair never leaks
    assert z2.grad[[0, 1, 3, 4]].abs().sum() > 0  # the other samples' second views are attended to
    assert z1.grad.abs().sum() > 0


def test_joint_output_with_local_crops_does_not_depend_on_own_other_views():
    torch.manual_seed(0)
    bf = BatchFormer(8, BatchFormerConfig(enabled=True, dropout=0.0)).train()
    views = [torch.randn(5, 8, requires_grad=True) for _ in range(4)]
    outs = bf(views)
    assert [o.shape for o in outs] == [(5, 8)] * 4
    (outs[3][1] * torch.randn(8)).sum().backward()
    for v in range(3):
        assert torch.equal(views[v].grad[1], torch.zeros(8))  # sample 1's other views: never attended
        assert views[v].grad[[0, 2, 3, 4]].abs().sum() > 0  # the other samples' views are
    assert views[3].grad[1].abs().sum() > 0


def test_per_view_scope_keeps_views_apart():
    torch.manual_seed(0)
    bf = BatchFormer(8, BatchFormerConfig(enabled=True, scope="per_view", dropout=0.0)).train()
    z1, z2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    out1, out2 = bf([z1, z2])
    (out1 * torch.randn_like(out1)).sum().backward()
    assert z2.grad is None or torch.equal(z2.grad, torch.zeros_like(z2))
    assert z1.grad[1:].abs().sum() > 0


def test_two_streams_only_in_training():
    bf = BatchFormer(8, BatchFormerConfig(enabled=True))
    views = [torch.randn(4, 8), torch.randn(4, 8)]
    streams = two_streams(bf.train(), views)
    assert [s.shape[0] for s in streams] == [8, 8]
    assert torch.equal(streams[0][:4], views[0])
    bf.eval()
    assert all(a is b for a, b in zip(two_streams(bf, views), views))


def tiny_method(cls, position="projector", **method_kwargs):
    backbone, dim = build_backbone(ModelConfig(arch="resnet18", width=0.125), in_channels=1, image_size=16)
    cfg = MethodConfig(
        name="simsiam" if cls is SimSiam else "mocov3",
        proj_hidden_dim=32,
        proj_dim=16,
        proj_layers=2,
        pred_hidden_dim=8,
        **method_kwargs,
    )
    return cls(backbone, dim, cfg, BatchFormerConfig(enabled=True, position=position, weight=0.5))


@pytest.mark.parametrize("cls", [SimSiam, MoCoV3])
@pytest.mark.parametrize("position", ["projector", "backbone"])
def test_batchformer_is_trained(cls, position):
    torch.manual_seed(0)
    method = tiny_method(cls, position).train()
    out = method([torch.randn(6, 1, 16, 16), torch.randn(6, 1, 16, 16)], 0, 10)
    assert out["loss"].item() == pytest.approx(out["loss_main"].item() + 0.5 * out["loss_bf"].item(), rel=1e-5)
    out["loss"].backward()
    bf_params = list(method.batchformer.named_parameters())
    assert bf_params and all(p.requires_grad for _, p in bf_params)
    for name, p in bf_params:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert method.batchformer in method.trainable_parts().values()
    grouped = {
        id(p) for g in method.parameter_groups(__import__("batchssl.config").config.OptimConfig()) for p in g["params"]
    }
    assert all(id(p) in grouped for _, p in bf_params)


def test_eval_mode_skips_batchformer():
    method = tiny_method(SimSiam).eval()
    out = method([torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16)])
    assert "loss_bf" not in out
    z1, _ = method.project([torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16)])
    assert z1.shape[0] == 4


def test_exported_backbone_has_no_batchformer(tmp_path):
    method = tiny_method(MoCoV3)
    export_backbone(method.backbone, tmp_path / "backbone.safetensors")
    fresh, _ = build_backbone(ModelConfig(arch="resnet18", width=0.125), in_channels=1, image_size=16)
    load_backbone(fresh, tmp_path / "backbone.safetensors")  # strict: exactly the backbone's keys
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "backbone.safetensors")).keys()
    assert not any("batchformer" in k or "self_attn" in k or "projector" in k for k in keys)


def test_two_stream_loss_pulls_both_streams_to_the_original_targets():
    from batchssl.batchformer import two_stream_loss

    calls = []

    def loss(online, targets):
        calls.append(([o.clone() for o in online], targets))
        return (online[0] - targets[1]).square().sum() + (online[1] - targets[0]).square().sum()

    n = 3
    p1, p2 = torch.arange(12.0).view(6, 2), -torch.arange(12.0).view(6, 2)
    t1, t2 = torch.ones(n, 2), torch.zeros(n, 2)
    out = two_stream_loss(loss, [p1, p2], [t1, t2], weight=0.5)
    assert len(calls) == 2
    assert torch.equal(calls[0][0][0], p1[:n]) and torch.equal(calls[1][0][0], p1[n:])  # original rows, then BF
    assert all(c[1][0] is t1 and c[1][1] is t2 for c in calls)  # both streams against the same original targets
    main, bf = loss([p1[:n], p2[:n]], [t1, t2]), loss([p1[n:], p2[n:]], [t1, t2])
    assert out["loss"].item() == main.item() + 0.5 * bf.item()
    assert out["loss_main"].item() == main.item() and out["loss_bf"].item() == bf.item()
    without = two_stream_loss(loss, [p1[:n], p2[:n]], [t1, t2], weight=0.5)  # no BatchFormer: one stream
    assert set(without) == {"loss", "loss_main"} and without["loss"].item() == main.item()
    # No targets (a method without a target branch): n says where the BatchFormer rows start.
    both = two_stream_loss(lambda online, targets: online[0].sum() - online[1].sum(), [p1, p2], [], 0.5, n=n)
    assert both["loss_bf"].item() == (p1[n:].sum() - p2[n:].sum()).item()


def test_cross_view_loss_pairs_every_view_with_the_other_targets():
    from batchssl.batchformer import cross_view_loss

    def pair(o, t):  # a number that names the pair: 10 * online view + target view
        return o * 10 + t

    online = [torch.tensor(float(i)) for i in range(4)]  # 2 global + 2 local views
    targets = [torch.tensor(float(j)) for j in range(2)]  # the global views' targets
    pairs = [(0, 1), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1)]
    expected = sum(10 * i + j for i, j in pairs) / len(pairs)
    assert cross_view_loss(pair, online, targets).item() == pytest.approx(expected)
    assert cross_view_loss(pair, online[:2], targets).item() == (1 + 10) / 2  # two views: the symmetric mean
    with pytest.raises(ValueError):
        cross_view_loss(pair, online[:1], targets[:1])


@pytest.mark.parametrize("cls", [SimSiam, MoCoV3])
def test_multi_crop_runs_through_the_pipeline_and_a_method(cls):
    """Two global + two local crops from the device pipeline, forward and backward with BatchFormer (joint)."""
    import numpy as np

    from batchssl.config import Config
    from batchssl.data import INFO
    from batchssl.pipeline import DevicePipeline

    cfg = Config()
    cfg.method.name = "simsiam" if cls is SimSiam else "mocov3"
    cfg.augment.local_crops, cfg.train.batch_size = 2, 6
    images = np.random.RandomState(0).randint(0, 256, (12, 28, 28)).astype(np.uint8)
    pipeline = DevicePipeline(cfg, INFO["fashion_mnist"], images, np.arange(12) % 10, torch.device("cpu"))
    views, labels = next(iter(pipeline.batches(0)))
    assert [tuple(v.shape) for v in views] == [(6, 1, 28, 28)] * 2 + [(6, 1, 12, 12)] * 2 and len(labels) == 6
    torch.manual_seed(0)
    method = tiny_method(cls).train()
    out = method(views, 0, 10)
    assert out["loss"].item() == pytest.approx(out["loss_main"].item() + 0.5 * out["loss_bf"].item(), rel=1e-5)
    out["loss"].backward()
    for name, part in method.trainable_parts().items():
        assert all(p.grad is not None for p in part.parameters()), name
    # The local crops take part in the loss.
    torch.manual_seed(0)
    other = tiny_method(cls).train()(views[:2] + [views[3], views[2].flip(-1)], 0, 10)
    assert other["loss_main"].item() != pytest.approx(out["loss_main"].item(), rel=1e-6)
