"""batchssl.report: the table (the evaluators' results files), curves.png, --compare, the t-SNE embedding."""

import json
import math

import numpy as np
import pytest
import torch
import yaml
from matplotlib.image import imread

from batchssl import report
from batchssl.errors import UserError


def write_run(
    run, epochs=3, steps_per_epoch=10, proj_dim=128, online=True, bf=True, collapse=False, seed=0, collapse_fraction=0.1
):
    """A synthetic run directory: config.yaml (the keys the report reads) and metrics.jsonl as the trainer writes
    them; a collapsed run's z_std is 0.001 of the healthy 1 / sqrt(proj_dim)."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "seed": seed,
                "method": {"name": "mocov3", "proj_dim": proj_dim},
                "monitor": {"collapse_fraction": collapse_fraction},
            }
        )
    )
    rng = np.random.default_rng(seed)
    lines = []
    for epoch in range(1, epochs + 1):
        for i in range(steps_per_epoch):
            step = (epoch - 1) * steps_per_epoch + i + 1
            t = step / (epochs * steps_per_epoch)
            loss = 7.0 - 3.0 * t + 0.1 * rng.standard_normal()
            line = {
                "epoch": epoch,
                "step": step,
                "lr": 0.1 * math.cos(math.pi * t / 2),
                "loss": loss,
                "z_std": (0.001 if collapse else 1.0) / math.sqrt(proj_dim) * (0.9 + 0.1 * rng.random()),
                "images_per_s": 1000 + 50 * rng.standard_normal(),
            }
            if bf:
                line.update(loss_main=loss / 2, loss_bf=loss / 2 + 0.05)
            lines.append(line)
        monitor = {
            "epoch": epoch,
            "step": epoch * steps_per_epoch,
            "knn_top1": 40.0 + 10 * epoch + seed,
            "knn_top5": 90.0,
            "knn_k": 200,
            "knn_seconds": 1.0,
        }
        if online:
            monitor.update(online_top1=45.0 + 10 * epoch, online_top5=95.0)
        lines.append(monitor)
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    return run


def check_png(path, width, height):
    """The picture exists, has that pixel size and is not blank."""
    assert path.is_file(), path
    pixels = imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels[..., :3].std() > 0.05  # a blank (one-colour) image has std 0
    return pixels


def test_curves_have_every_panel(tmp_path):
    run = write_run(tmp_path / "run")
    out = report.plot_curves(run)
    assert out == run / "curves.png"
    check_png(out, *report.figure_pixels(5))  # loss, lr, top-1, z-std, images/s
    assert report.figure_pixels(5) == (1500, 720)


def test_missing_metrics_leave_their_panels_out(tmp_path):
    run = tmp_path / "only_loss"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"epoch": 1, "step": s, "loss": 5.0 / s}) + "\n" for s in range(1, 6))
    )
    check_png(report.plot_curves(run), *report.figure_pixels(1))  # no config.yaml either
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.plot_curves(empty) is None and not (empty / "curves.png").exists()


def test_series_in_fractional_epochs(tmp_path):
    metrics = report.read_metrics(write_run(tmp_path / "run", epochs=2, steps_per_epoch=4))
    assert report.steps_per_epoch(metrics) == 4
    xs, ys = report.series(metrics, "loss")
    assert xs[:4] == [0.25, 0.5, 0.75, 1.0] and len(ys) == 8
    assert report.series(metrics, "knn_top1")[0] == [1.0, 2.0]


def test_compare_two_runs(tmp_path):
    a = write_run(tmp_path / "with_bf", seed=0)
    b = write_run(tmp_path / "without_bf", bf=False, online=False, seed=1)
    out = report.plot_compare([a, b], tmp_path / "figs" / "compare.png")
    check_png(out, *report.figure_pixels(4))  # loss, kNN, online, z-std
    assert report.figure_pixels(4) == (1000, 720)


def test_compare_labels_tell_equal_names_apart(tmp_path):
    assert report._run_labels([tmp_path / "a" / "seed0", tmp_path / "b" / "seed0"]) == ["a/seed0", "b/seed0"]
    assert report._run_labels([tmp_path / "x", tmp_path / "y"]) == ["x", "y"]


def results_file(path, records: dict, latest: str) -> None:
    """An evaluator's results file (batchssl.cli.record_result's layout)."""
    path.write_text(json.dumps({"entries": records, "latest": latest}))


def test_table_rows(tmp_path):
    run = write_run(tmp_path / "run")
    report.plot_curves(run)
    knn_record = {
        "dataset": "fashion_mnist",
        "arch": "resnet18",
        "temperature": 0.07,
        "results": {"200": {"top1": 71.5, "top5": 97.25}},
    }
    results_file(run / "knn.json", {"T0.07": knn_record}, "T0.07")
    results_file(
        run / "linear_probe.json",
        {"c": {"mode": "cached", "top1": 80.0, "top5": 99.0, "lr": 0.1, "seconds": 12.0}},
        "c",
    )
    table = dict(report.rows(run))
    assert table["training"].startswith("epoch 3, step 30, loss ")
    assert table["kNN monitor (k=200, epoch 3)"] == "top-1 70.00"
    assert table["online linear (epoch 3)"] == "top-1 75.00, top-5 95.00"
    assert table["z-std (last)"].endswith("(healthy ~ 1/sqrt(128) = 0.0884)")
    assert table["kNN eval (k=200, T=0.07)"] == "top-1 71.50, top-5 97.25"
    assert table["linear probe (cached)"] == "top-1 80.00 (lr 0.1, 12 s)"
    assert table["picture (curves)"] == str(run / "curves.png")
    assert "picture (embedding)" not in table


def test_table_with_several_entries(tmp_path):
    run = write_run(tmp_path / "run", online=False, collapse=True)
    results_file(
        run / "knn.json", {"T0.1": {"temperature": 0.1, "results": {"20": {"top1": 60.0, "top5": 90.0}}}}, "T0.1"
    )
    results_file(
        run / "linear_probe.json",
        {
            "cached-a": {"mode": "cached", "top1": 81.0, "lr": 0.3, "seconds": 5.0},
            "augmented-b": {"mode": "augmented", "top1": 83.0, "lr": 1.0, "seconds": 50.0},
            "cached-c": {"mode": "cached", "top1": 82.0},
        },
        "cached-a",
    )
    table = report.rows(run)
    names = [name for name, _ in table]
    assert not any(name.startswith("online linear") for name in names)
    assert dict(table)["kNN eval (k=20, T=0.1)"] == "top-1 60.00, top-5 90.00"
    probes = [(n, v) for n, v in table if n.startswith("linear probe")]
    assert probes == [
        ("linear probe (augmented)", "top-1 83.00 (lr 1, 50 s)  [augmented-b]"),
        ("linear probe (cached)", "top-1 82.00  [cached-c]"),
        ("linear probe (cached)", "top-1 81.00 (lr 0.3, 5 s)  [cached-a]"),
    ]  # latest last
    assert dict(table)["z-std (last)"].endswith("COLLAPSED?")


@pytest.mark.parametrize("fraction, collapsed", [(0.1, False), (0.5, True)])
def test_collapse_verdict_uses_the_runs_own_fraction(tmp_path, fraction, collapsed):
    # The last z_std is 0.3 / sqrt(128) (a healthy run's times 0.3): collapsed below a 0.5 threshold, not 0.1.
    run = write_run(tmp_path / "run", collapse_fraction=fraction)
    lines = report.read_metrics(run)
    [m for m in lines if "z_std" in m][-1]["z_std"] = 0.3 / 128**0.5
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    assert dict(report.rows(run))["z-std (last)"].endswith("COLLAPSED?") == collapsed


def test_results_file_of_another_layout_is_refused_not_overwritten(tmp_path, capsys):
    from batchssl.cli import record_result

    run = write_run(tmp_path / "run")
    old = json.dumps({"temperature": 0.1, "results": {"20": {"top1": 60.0, "top5": 90.0}}})  # no "entries"
    (run / "knn.json").write_text(old)
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(run), "--no-curves"])
    assert exit_info.value.code == 2
    assert "knn.json is not an evaluator's results file" in capsys.readouterr().err
    with pytest.raises(UserError, match="not an evaluator's results file"):
        record_result(run / "knn.json", "k", {"results": {}})
    assert (run / "knn.json").read_text() == old


def test_command_line(tmp_path, capsys, monkeypatch):
    run = write_run(tmp_path / "run")
    report.main([str(run)])
    out = capsys.readouterr().out
    assert f"Results of {run}" in out and "online linear (epoch 3)" in out and "curves.png" in out
    check_png(run / "curves.png", *report.figure_pixels(5))

    other = write_run(tmp_path / "other", seed=1)
    monkeypatch.chdir(tmp_path)
    report.main(["--compare", str(run), str(other)])
    check_png(tmp_path / "compare.png", *report.figure_pixels(4))  # default: compare.png in the cwd
    report.main(["--compare", str(run), str(other), "--out", str(tmp_path / "c2.png")])
    assert (tmp_path / "c2.png").is_file()


@pytest.mark.parametrize("argv", [[], ["nowhere"], ["--compare", "nowhere"]])
def test_command_line_errors(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        report.main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_embedding_png_of_clustered_features(tmp_path):
    """The (features, labels) -> png function on random clustered features (a real run: the next test)."""
    pytest.importorskip("sklearn")
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(150) % 3
    features = torch.randn(3, 64, generator=g)[labels] * 3 + torch.randn(150, 64, generator=g)
    # One OpenMP thread: seconds even while other processes hold the cores (see embedding_png).
    out = report.embedding_png(features, labels, tmp_path / "emb.png", class_names=["a", "b", "c"], threads=1)
    width, height = (round(v * report.DPI) for v in report.EMBEDDING_INCHES)
    pixels = check_png(out, width, height)
    # Deterministic: the same features give the same picture.
    again = report.embedding_png(features, labels, tmp_path / "emb2.png", class_names=["a", "b", "c"], threads=1)
    assert np.array_equal(imread(again), pixels)


def test_embedding_of_a_real_run_directory(tmp_path):
    """--embedding end to end on a run directory with an untrained backbone (no training needed)."""
    pytest.importorskip("sklearn")
    from batchssl.backbones import build_backbone
    from batchssl.checkpoint import BACKBONE_FILE, export_backbone
    from batchssl.config import Config, apply_overrides, build_config, save_config, to_dict
    from batchssl.data import dataset_info

    run = tmp_path / "run"
    run.mkdir()
    cfg = build_config(
        apply_overrides(
            to_dict(Config()), ["data.val_limit=60", "data.num_workers=0", "model.width=0.25", f"output_dir={run}"]
        )
    )
    save_config(cfg, run / "config.yaml")
    info = dataset_info(cfg.data)
    backbone, _ = build_backbone(cfg.model, info.in_channels, info.image_size)
    export_backbone(backbone, run / BACKBONE_FILE)
    report.main([str(run), "--embedding", "--samples", "50", "--threads", "1", "--no-curves"])
    width, height = (round(v * report.DPI) for v in report.EMBEDDING_INCHES)
    check_png(run / "embedding.png", width, height)
