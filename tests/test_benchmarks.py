"""The benchmark scripts: quality.py end to end on a tiny slice (two recipes run at once with --jobs, linear probes,
floors, the JSON table and the plot, and a rerun that reuses the finished runs instead of training again), the
FLOP counts, long_tail_study.py's tables and Welch's test.

The scripts' main(argv) runs in this process (their own pretraining and probe runs stay the subprocesses they are);
long_tail_study.py also runs once as a real process."""

import json
import statistics
import sys

import pytest
import torch
import yaml

from batchssl.cpu import effective_precision
from helpers import REPO, TINY, load_script, own_process_state, run_entry

sys.path.insert(0, str(REPO / "benchmarks"))  # long_tail_study.py imports quality.py by name, as when run


@pytest.mark.slow
def test_quality_benchmark_runs_two_recipes_at_once_and_reuses_them(tmp_path, capsys):
    quality = load_script("benchmarks/quality.py")
    argv = [
        "--recipes",
        "mocov3",
        "simsiam_bf",
        "--seeds",
        "0",
        "--holdout",
        "200",
        "--jobs",
        "2",
        "--out",
        str(tmp_path),
        "--set",
        *TINY,
        "--set",
        "monitor.k=20",
        "--note",
        "two at once",
    ]
    with own_process_state():
        quality.main(argv)
    first = capsys.readouterr().out
    assert first.count("$ ") == 2  # one pretraining command per recipe
    out = tmp_path / "holdout200"
    table = json.loads((out / "quality.json").read_text())
    assert [row["recipe"] for row in table["rows"]] == ["mocov3", "simsiam_bf"]
    assert "data.holdout=200" in table["overrides"] and "monitor.k=20" in table["overrides"]  # both --set kept
    for row in table["rows"]:
        assert 0 < row["knn_top1"][0] <= 100 and 0 < row["linear_top1"][0] <= 100 and row["minutes"][0] > 0
        run = out / f"{row['recipe']}_s0"
        knn = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "knn_top1" in line]
        assert knn[-1]["knn_top1"] == row["knn_top1"][0]  # the final epoch's monitor line
        assert row["knn_curves"] == [[[m["epoch"], m["knn_top1"]] for m in knn]]  # seed 0's whole curve
        speeds = [
            json.loads(line)["images_per_s"]
            for line in (run / "metrics.jsonl").read_text().splitlines()
            if "images_per_s" in line
        ]
        assert len(speeds) >= 2 and row["median_images_per_s"] == [pytest.approx(statistics.median(speeds))]
        assert (out / f"{row['recipe']}_s0.log").is_file()  # the run's output, kept beside it
        requested = yaml.safe_load((run / "config.yaml").read_text())["train"]["mixed_precision"]
        trained_in = {"no": "fp32"}.get(effective_precision(requested, on_cpu=not torch.cuda.is_available()), requested)
        assert row["precision"] == [trained_in] and row["device"] == [quality.cpu_model()]  # what it really ran in
    assert 0 < table["floors"]["raw_pixels"] <= 100 and len(table["floors"]["random_init"]) == 1
    assert (out / "knn_over_epochs.png").stat().st_size > 0
    assert table["bf_vs_plain"] == []  # one seed and no BF twin: nothing to test
    assert table["note"] == "two at once"
    for row in table["rows"]:  # the printed curve over epochs: one seed, so each epoch's value as logged
        curve = "; ".join(f"epoch {e}: {v:.2f}" for e, v in row["knn_curves"][0])
        assert f"{row['recipe']:<22} {curve}" in first

    with own_process_state():
        quality.main(argv)
    assert "$ " not in capsys.readouterr().out  # nothing was trained again
    assert json.loads((out / "quality.json").read_text())["rows"] == table["rows"]


@pytest.mark.parametrize(
    "overrides", [[], ["batchformer.scope=per_view"], ["batchformer.position=backbone", "train.batch_size=64"]]
)
def test_batchformer_flops_closed_form_matches_flop_counter(overrides):
    """The BatchFormer layer's FLOPs in a training step of the default recipe, counted by FlopCounterMode on the
    meta device (benchmarks/flops.py, as train_throughput.py uses it), equal the closed form from its shapes."""
    import torch

    from batchssl.backbones import build_backbone
    from batchssl.config import load_config

    flops = load_script("benchmarks/flops.py")
    cfg = load_config(REPO / "recipes" / "fashion_mnist" / "mocov3_bf.yaml", overrides)
    with torch.device("meta"):
        feature_dim = build_backbone(cfg.model, 1, 28)[1]
    total, layer = flops.step_flops(cfg)
    assert layer == pytest.approx(flops.batchformer_flops_closed_form(cfg, feature_dim), rel=1e-9)
    assert 0 < layer < total
    no_bf, none = flops.step_flops(
        load_config(REPO / "recipes" / "fashion_mnist" / "mocov3_bf.yaml", overrides + ["batchformer.enabled=false"])
    )
    assert none is None and no_bf < total


def test_long_tail_study_scores_the_lt_runs_rare_classes_in_both_runs():
    from long_tail_study import few_classes, scores, summarise

    # Fashion-MNIST-LT's counts: "few" are classes 7, 8, 9 (166, 100, 60 images), whatever the balanced run saw
    lt_counts = [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]
    assert few_classes(lt_counts) == [7, 8, 9]
    per_class = [90.0, 80.0, 70.0, 60.0, 50.0, 40.0, 30.0, 20.0, 10.0, 0.0]
    got = scores(per_class, [7, 8, 9])
    assert got["few"] == pytest.approx(10.0)  # (20 + 10 + 0) / 3
    assert got["class_std"] == pytest.approx(28.722813, abs=1e-6)  # population std of 0, 10, ..., 90
    record = {"top1": 45.0, "per_class": per_class}
    rows = summarise(
        {("mocov3", "lt"): [(record, record), (record, {"top1": 50.0, "per_class": [50.0] * 10})]}, [7, 8, 9]
    )
    assert rows == [
        {
            "method": "mocov3",
            "split": "lt",
            "knn_top1": [45.0, 45.0],
            "knn_few": [10.0, 10.0],
            "knn_class_std": [pytest.approx(28.722813), pytest.approx(28.722813)],
            "linear_top1": [45.0, 50.0],
            "linear_few": [10.0, 50.0],
            "linear_class_std": [pytest.approx(28.722813), 0.0],
        }
    ]


def test_bf_effects_welch_p_by_hand():
    from long_tail_study import METRICS
    from quality import bf_effects

    def row(method, split, values):
        return {"method": method, "split": split, **{m: values for m in METRICS}}

    # BF: two seeds, 5 +- sqrt(2/3) (variance 4/3); plain: 1, 2, 3 (variance 1). Welch: se = sqrt(2/3 + 1/3) = 1,
    # t = (5 - 2) / 1 = 3, df = 1 / ((2/3)^2 / 1 + (1/3)^2 / 2) = 2, and for df = 2 the two-sided p is
    # 1 - t / sqrt(2 + t^2) = 0.0955 (Student's pooled test would give t = 3.12 on 3 df: a different p)
    half = (2 / 3) ** 0.5
    rows = [
        row("simsiam", "lt", [1.0, 2.0, 3.0]),
        row("simsiam_bf", "lt", [5.0 - half, 5.0 + half]),
        row("mocov3", "lt", [1.0, 2.0]),
        row("mocov3_bf", "lt", [1.0]),  # one BF seed: no test
        row("simsiam", "balanced", [1.0, 2.0]),
    ]  # no BF twin on that split
    effects = bf_effects(rows, METRICS, same=("split",))
    assert [(e["method"], e["split"]) for e in effects] == [("simsiam", "lt")]
    for metric in METRICS:
        assert effects[0][metric]["difference"] == pytest.approx(3.0)
        assert effects[0][metric]["welch_p"] == pytest.approx(1 - 3 / 11**0.5, abs=1e-9)
    # quality.py's rows pair on the method alone (one split per table); the same numbers give the same test
    table = [
        {"method": "mocov3", "knn_top1": [1.0, 2.0, 3.0]},
        {"method": "mocov3_bf", "knn_top1": [5 - half, 5 + half]},
        {"method": "simsiam_bf", "knn_top1": [1.0, 2.0]},
    ]  # no plain twin: no test
    effects = bf_effects(table, ["knn_top1"])
    assert effects == [
        {
            "method": "mocov3",
            "knn_top1": {"difference": pytest.approx(3.0), "welch_p": pytest.approx(1 - 3 / 11**0.5, abs=1e-9)},
        }
    ]


def test_long_tail_study_finished_only_takes_runs_with_both_evaluations(tmp_path):
    from long_tail_study import finished, main, seed_counts, summarise

    knn = {"top1": 80.0, "per_class": [80.0] * 10}
    linear = {"top1": 85.0, "per_class": [85.0] * 10, "mode": "cached"}

    def run(name, timing=True, knn_entry=True, probe=True):
        directory = tmp_path / name
        directory.mkdir()
        if timing:
            (directory / "timing.json").write_text(json.dumps({"pretrain_seconds": 1.0}))
        if knn_entry:  # knn_eval's layout: entries keyed by settings, results keyed by k
            (directory / "knn.json").write_text(
                json.dumps({"entries": {"a": {"temperature": 0.07, "results": {"20": knn, "200": knn}}}})
            )
        if probe:
            (directory / "linear_probe.json").write_text(
                json.dumps({"entries": {"augmented": {**linear, "mode": "augmented", "top1": 1.0}, "cached": linear}})
            )
        return directory

    assert finished(run("done")) == (knn, linear)
    assert finished(run("training", timing=False)) is None  # no timing.json: pretraining has not finished
    assert finished(run("no_probe", probe=False)) is None
    assert finished(run("no_knn", knn_entry=False)) is None
    rows = summarise({("mocov3", "lt"): [(knn, linear)]}, [7, 8, 9], {("mocov3", "lt"): [2]})
    assert rows[0]["seeds"] == [2] and rows[0]["knn_top1"] == [80.0] and rows[0]["linear_few"] == [85.0]
    # the plot's legend says how many seeds a split's bars stand on (one: no error bar)
    two = summarise({("mocov3", "lt"): [(knn, linear)] * 2, ("mocov3_bf", "lt"): [(knn, linear)]}, [7, 8, 9])
    assert seed_counts(two, "lt") == "seeds: 1/2" and seed_counts(rows, "lt") == "seeds: 1"
    # the command itself: one finished run of the two asked for, tabulated with its seed; nothing finished -> exit 1
    out = tmp_path / "study"
    (out / "test").mkdir(parents=True)
    (tmp_path / "done").rename(out / "test" / "mocov3_lt_s1")
    args = ["--finished-only", "--out", str(out), "--seeds", "1", "--splits", "lt", "--methods"]
    shown = run_entry("benchmarks/long_tail_study.py", *args, "mocov3", "mocov3_bf").stdout  # the script, as run
    assert "not finished (left out): mocov3_bf lt seed 1" in shown
    written = json.loads((out / "test" / "long_tail.json").read_text())
    assert [r["seeds"] for r in written["rows"]] == [[1]] and written["bf_vs_plain"] == []  # one seed: no test
    assert not list((out / "test").glob("mocov3_bf*"))  # started nothing
    with pytest.raises(SystemExit) as empty:  # sys.exit(message): exit status 1, the message on stderr
        main([*args, "mocov3_bf"])
    assert isinstance(empty.value.code, str) and empty.value.code.startswith("no finished run")
