"""BYOL, SimCLR, Barlow Twins, VICReg and DINO: each loss against a value worked out by hand from the paper's
formula, the parts each method owns (stop-gradient targets, rank offsets, DINO's centre, temperature warmup and
frozen last layer), the BatchFormer streams, and the gathered losses on two processes against one (torchrun)."""

import json
import math

import pytest
import torch
from lightly.loss import NTXentLoss

import batchssl.methods.simclr as simclr
from batchssl.config import BatchFormerConfig, Config, MethodConfig
from batchssl.methods import METHODS, build_method
from batchssl.methods.barlowtwins import barlow_twins_loss
from batchssl.methods.byol import BYOL, byol_regression
from batchssl.methods.dino import dino_loss, teacher_temperature
from batchssl.methods.simclr import nt_xent
from batchssl.methods.vicreg import vicreg_loss
from helpers import REPO, load_script, run_entry

NEW = ["byol", "simclr", "barlowtwins", "vicreg", "dino"]


def tiny_backbone():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8))


def tiny(name: str, batchformer: bool = False, **method) -> torch.nn.Module:
    cfg = MethodConfig(
        name=name,
        proj_hidden_dim=16,
        proj_dim=16,
        proj_layers=2,
        pred_hidden_dim=8,
        dino_bottleneck_dim=8,
        temperature=0.2,
        **method,
    )
    extra = {"epochs": 2} if name == "dino" else {}
    return METHODS[name](tiny_backbone(), 8, cfg, BatchFormerConfig(enabled=batchformer, dropout=0.0), **extra)


# ------------------------------------------------------------------------------------------- losses by hand


def test_nt_xent_by_hand():
    tau = 0.5
    z1 = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # normalised inside: e1, e2
    z2 = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # e1, e2: each pair identical, the two samples orthogonal
    # Each of the 4 rows: itself masked, its positive at cos 1 (logit 1 / tau = 2), two negatives at cos 0.
    expected = -math.log(math.exp(2) / (math.exp(2) + 2))
    assert nt_xent(z1, z2, tau).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_equals_lightly_on_one_process():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    assert nt_xent(z1, z2, 0.2).item() == pytest.approx(NTXentLoss(temperature=0.2)(z1, z2).item(), rel=1e-5)


def test_nt_xent_positives_and_self_mask_are_offset_by_rank(monkeypatch):
    """Rank 1 of 2 (one sample each): its anchors are rows 1 of the gathered views 1 and 2, columns [a, b, c, d]
    = [rank 0 view 1, rank 1 view 1, rank 0 view 2, rank 1 view 2]."""
    other = {0: torch.tensor([[0.0, 1.0]]), 1: torch.tensor([[0.0, 1.0]])}  # rank 0's views: both along e2
    calls = []

    def gather(x):
        calls.append(x)
        return torch.cat([other[len(calls) - 1], x])

    monkeypatch.setattr(simclr, "rank", lambda: 1)
    monkeypatch.setattr(simclr, "all_gather_grad", gather)
    z = torch.tensor([[1.0, 0.0]])  # rank 1's two views: both e1
    # anchor view 1 (column b masked): logits [a, c, d] = [0, 0, 1]; positive d. Same for view 2 (d masked, b).
    expected = -math.log(math.e / (2 + math.e))
    assert nt_xent(z, z.clone(), 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_barlow_twins_by_hand():
    lam = 0.0051
    # Batch norm (biased variance) maps each column of two opposite values to +-1 (up to eps = 1e-5):
    z1 = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])  # -> [[1, 1], [-1, -1]]
    z2 = torch.tensor([[3.0, -1.0], [-3.0, 1.0]])  # -> [[1, -1], [-1, 1]]
    # C = bn(z1)^T bn(z2) / 2 = [[1, -1], [1, -1]]: on-diagonal (1 - 1)^2 + (1 - (-1))^2 = 4; off-diagonal
    # (-1)^2 + 1^2 = 2.
    assert barlow_twins_loss(z1, z2, lam).item() == pytest.approx(4 + lam * 2, rel=1e-4)


def test_vicreg_by_hand():
    z1 = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    z2 = torch.tensor([[1.0, 0.0], [-1.0, 2.0]])
    invariance = (0 + 0 + 0 + 2.0**2) / 4  # MSE over the 4 entries
    # std per dimension (unbiased, eps 1e-4): z1 [sqrt(2), 0.01] -> hinge [0, 0.99], mean 0.495; z2 [sqrt(2),
    # sqrt(2)] -> 0. Variance term: the mean of the two views.
    variance = 0.5 * ((0 + (1 - math.sqrt(1e-4))) / 2 + 0)
    # Covariance (N - 1 = 1): z1's off-diagonal is 0; z2 centred [[1, -1], [-1, 1]] -> cov_01 = -2: sum of the
    # squared off-diagonal 2 * 4 = 8, over D = 2 -> 4.
    covariance = 0 + 8 / 2
    expected = 25 * invariance + 25 * variance + 1 * covariance  # 25 + 6.1875 + 4
    assert vicreg_loss(z1, z2, (25.0, 25.0, 1.0)).item() == pytest.approx(expected, rel=1e-6)


def test_vicreg_covariance_term_equals_lightlys_with_its_gradient():
    from lightly.loss.vicreg_loss import covariance_loss as lightlys

    from batchssl.methods.vicreg import covariance_loss

    z = torch.randn(32, 24, dtype=torch.float64, requires_grad=True)
    ours, theirs = covariance_loss(z), lightlys(z)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
    (g_ours,), (g_theirs,) = torch.autograd.grad(ours, z), torch.autograd.grad(theirs, z)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12)


def test_byol_symmetric_loss_by_hand_and_stop_gradient():
    p1, z2 = torch.tensor([[1.0, 0.0]], requires_grad=True), torch.tensor([[1.0, 1.0]], requires_grad=True)
    p2, z1 = torch.tensor([[0.0, 1.0]], requires_grad=True), torch.tensor([[3.0, 0.0]], requires_grad=True)
    loss = BYOL.loss([p1, p2], [z1, z2])
    # l(p1, z2') = 2 - 2 / sqrt(2); l(p2, z1') = 2 - 0: the paper's L + L~.
    assert loss.item() == pytest.approx((2 - math.sqrt(2)) + 2, rel=1e-6)
    loss.backward()
    assert p1.grad.abs().sum() > 0 and z1.grad is None and z2.grad is None
    assert byol_regression(torch.tensor([[1.0, 0.0]]), torch.tensor([[-2.0, 0.0]])).item() == pytest.approx(4.0)


def test_dino_loss_by_hand():
    t_s = 0.1
    s1 = torch.tensor([[0.0, 0.0]])  # softmax [1/2, 1/2]
    s2 = torch.tensor([[math.log(3) * t_s, 0.0]])  # softmax of s2 / t_s: [3/4, 1/4]
    t1, t2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])
    # H(t1, s2) = -log(3/4); H(t2, s1) = -log(1/2); the mean over the two cross-view pairs.
    expected = (math.log(4 / 3) + math.log(2)) / 2
    assert dino_loss([s1, s2], [t1, t2], t_s).item() == pytest.approx(expected, rel=1e-6)


def test_dino_teacher_temperature_warmup():
    assert teacher_temperature(0, 10, 0.04, 0.07) == pytest.approx(0.04)
    assert teacher_temperature(5, 10, 0.04, 0.07) == pytest.approx(0.055)
    assert teacher_temperature(10, 10, 0.04, 0.07) == teacher_temperature(99, 10, 0.04, 0.07) == 0.07
    assert teacher_temperature(0, 0, 0.04, 0.07) == 0.07  # no warmup
    # In the method: 1 of 2 epochs of warmup over 10 steps -> 5 steps, logged.
    method = tiny("dino", teacher_temp_start=0.04, teacher_temp=0.07, teacher_temp_warmup_epochs=1)
    views = [torch.randn(4, 12), torch.randn(4, 12)]
    temps = [method(views, step, 10)["teacher_temp"].item() for step in (0, 2, 5, 9)]
    assert temps == pytest.approx([0.04, 0.052, 0.07, 0.07])


def test_dino_centre_is_the_ema_of_the_teachers_batch_mean():
    torch.manual_seed(0)
    method = tiny("dino", center_momentum=0.9)
    views = [torch.randn(4, 12), torch.randn(4, 12)]
    method(views, 0, 10)
    with torch.no_grad():  # the teacher as this step used it (its EMA update came before its forward)
        out = torch.cat(
            [method.predictor_momentum(method.projector_momentum(method.backbone_momentum(x))) for x in views]
        )
    assert torch.allclose(method.center, 0.1 * out.mean(dim=0, keepdim=True), atol=1e-7)
    method.eval()(views, 0, 10)  # evaluation changes nothing
    assert torch.allclose(method.center, 0.1 * out.mean(dim=0, keepdim=True), atol=1e-7)


def test_dino_last_layer_is_frozen_for_its_epochs_only():
    method = tiny("dino", dino_freeze_last_layer_epochs=1)  # 1 of 2 epochs: steps 0..4 of 10
    views = [torch.randn(4, 12), torch.randn(4, 12)]
    trainable = [p for p in method.predictor.parameters() if p.requires_grad]
    assert len(trainable) == 1  # dino_norm_last_layer: the gain stays 1, only the direction v trains
    for step, frozen in ((4, True), (5, False)):
        method.zero_grad()
        method(views, step, 10)["loss"].backward()
        assert (trainable[0].grad.abs().sum().item() == 0) == frozen
        assert method.backbone[1].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- methods


@pytest.mark.parametrize("name", NEW)
def test_registry_builds_each_method_from_a_config(name):
    cfg = Config()
    cfg.method = MethodConfig(name=name, proj_hidden_dim=16, proj_dim=16, pred_hidden_dim=8, dino_bottleneck_dim=8)
    method = build_method(cfg, tiny_backbone(), 8)
    assert type(method) is METHODS[name]
    out = method([torch.randn(4, 12), torch.randn(4, 12)], 0, 10)
    assert out["loss"].ndim == 0 and math.isfinite(out["loss"].item()) and "z_std" in out


@pytest.mark.parametrize("name", NEW)
def test_batchformer_stream_trains_and_targets_stay_original(name):
    torch.manual_seed(0)
    method = tiny(name, batchformer=True)
    views = [torch.randn(6, 12), torch.randn(6, 12)]
    out = method(views, 0, 10)
    assert out["loss"].item() == pytest.approx((out["loss_main"] + out["loss_bf"]).item(), rel=1e-6)
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.batchformer.parameters() if p.ndim > 1), (
        "BatchFormer must receive gradients"
    )
    momentum = [p for n, p in method.named_parameters() if "momentum" in n]
    assert (len(momentum) > 0) == (name in ("byol", "dino"))
    assert all(p.grad is None for p in momentum)
    grouped = {id(p) for g in method.parameter_groups(Config().optim) for p in g["params"]}
    assert not grouped & {id(p) for p in momentum}
    assert not any(isinstance(m, type(method.batchformer)) for n, m in method.named_modules() if "momentum" in n)


def test_symmetric_batchformer_stream_is_its_own_batch():
    """SimCLR's BatchFormer stream: NT-Xent over the attended projections alone, so a sample's original and
    attended projections are never each other's negatives (a 2n-row batch would make them so)."""
    torch.manual_seed(0)
    method = tiny("simclr", batchformer=True)
    views = [torch.randn(6, 12), torch.randn(6, 12)]
    out = method(views, 0, 10)
    z = method.project(views)  # deterministic (dropout 0, batch norm on the same batch)
    assert out["loss_bf"].item() == pytest.approx(nt_xent(z[0][6:], z[1][6:], 0.2).item(), rel=1e-6)
    assert out["loss_main"].item() == pytest.approx(nt_xent(z[0][:6], z[1][:6], 0.2).item(), rel=1e-6)


@pytest.mark.parametrize("name", NEW)
def test_multi_crop_views_run_through_each_method(name):
    """Two global crops and two smaller local crops (any number of views flows through the loop)."""
    backbone = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 8))
    cfg = MethodConfig(
        name=name, proj_hidden_dim=16, proj_dim=16, proj_layers=2, pred_hidden_dim=8, dino_bottleneck_dim=8
    )
    extra = {"epochs": 1} if name == "dino" else {}
    method = METHODS[name](backbone, 8, cfg, BatchFormerConfig(enabled=True, dropout=0.0), **extra)
    views = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)]
    out = method(views, 0, 10)
    out["loss"].backward()
    assert math.isfinite(out["loss"].item()) and backbone[2].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- two processes


@pytest.mark.slow
def test_gathered_losses_and_methods_on_two_processes_equal_one(tmp_path):
    """One torchrun launch checks every gathered loss (SimCLR, Barlow Twins, VICReg; fp32 tight, bf16 loose) and
    every new method's gradients under DDP with BatchFormer gathered and synced batch norm (float64), plus DINO's
    centre, against references this process computes on the whole batch (tests/helpers/methods_2proc.py)."""
    script = REPO / "tests" / "helpers" / "methods_2proc.py"
    reference = tmp_path / "reference.pt"
    run_entry(script, reference, timeout=300)
    result = run_entry(script, reference, launcher="torchrun", timeout=400, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("ok ") == 3 * 2 + 5, result.stdout


def test_methods_study_is_quality_py_over_every_method_beside_its_twin():
    """benchmarks/methods_study.py hands quality.py (tested end to end in test_benchmarks.py) the 14 recipes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("methods_study", REPO / "benchmarks" / "methods_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    argv = study.quality_argv(["--seeds", "0", "--holdout", "200"])
    recipes = argv[1 : argv.index("--out")]
    assert recipes == [f"{m}{bf}" for m in ["simsiam", "mocov3", *NEW] for bf in ("", "_bf")]
    assert all((REPO / "recipes" / "fashion_mnist" / f"{r}.yaml").is_file() for r in recipes)
    assert argv[argv.index("--out") + 1].endswith("methods_study") and argv[-4:] == ["--seeds", "0", "--holdout", "200"]
    pin = ["--set", "train.mixed_precision=no"]  # every study run in fp32, whatever CPU each session has
    dino = ["--recipes", "dino", "dino_bf", *pin, "--out", "x"]
    assert study.quality_argv(["--methods", "dino", "--out", "x"]) == dino
    # a caller's own --set comes after the pin, so quality.py's overrides (applied in order) let it win
    argv = study.quality_argv(["--methods", "dino", "--set", "train.mixed_precision=bf16"])
    assert argv.index("train.mixed_precision=no") < argv.index("train.mixed_precision=bf16")


def test_methods_study_table_and_picture_from_quality_results(tmp_path):
    """The study's table: means +- std of each recipe's seeds and quality.py's BF-minus-plain Welch p, by hand."""
    from scipy.stats import ttest_ind

    study = load_script("benchmarks/methods_study.py")
    import quality  # on sys.path once methods_study is loaded, as when the script runs

    def row(recipe, knn, linear):
        return {"recipe": recipe, "method": recipe, "knn_top1": knn, "linear_top1": linear}

    rows = [
        row("byol", [80.0, 82.0, 84.0], [85.0, 85.5, 86.0]),
        row("byol_bf", [83.0, 84.0, 85.0], [86.0, 86.0, 86.6]),
        row("dino", [70.0, 71.0, 72.0], [75.0, 76.0, 77.0]),  # no twin: not in the table
    ]
    results = {"rows": rows, "bf_vs_plain": quality.bf_effects(rows, ["knn_top1", "linear_top1"]), "seeds": [0, 1, 2]}
    table = study.study_table(results).splitlines()
    p_knn = ttest_ind([83.0, 84.0, 85.0], [80.0, 82.0, 84.0], equal_var=False).pvalue
    assert table[2] == (
        f"| byol | 82.00 +- 2.00 | 84.00 +- 1.00 | +2.00 (p {p_knn:.3f}) | 85.50 +- 0.50 | 86.20 +- 0.35 | "
        f"+0.70 (p {ttest_ind([86.0, 86.0, 86.6], [85.0, 85.5, 86.0], equal_var=False).pvalue:.3f}) |"
    )
    assert len([line for line in table if line.startswith("| ")]) == 2  # the header and byol; dino has no BF twin
    assert table[-1] == "Every run in an unrecorded precision, device not recorded."  # rows from before the record
    cpu = {"precision": ["fp32"] * 3, "device": ["AMD EPYC"] * 3}
    same = [{**r, **cpu} for r in rows]
    assert study.machines_line(same) == "Every run in fp32, on AMD EPYC."
    same[1] = {**rows[1], "precision": ["fp32", "bf16", "fp32"], "device": ["AMD EPYC", "Intel Xeon", "AMD EPYC"]}
    assert study.machines_line(same) == (
        "WARNING: the runs differ in precision (bf16: byol_bf; fp32: byol, byol_bf, dino), on AMD EPYC; Intel Xeon."
    )
    argv = study.quality_argv(["--seeds", "0", "--holdout", "200", "--out", str(tmp_path), "--tag", "_x"])
    path = study.results_path(argv)
    assert path == tmp_path / "holdout200" / "quality_x.json"
    path.parent.mkdir()
    path.write_text(json.dumps(results))
    study.report(path)
    assert (path.parent / "study.md").read_text() == study.study_table(results)
    assert (path.parent / "methods_study.png").stat().st_size > 10_000
