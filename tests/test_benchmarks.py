"""benchmarks/quality.py end to end on a tiny slice: two recipes run at once (--jobs), linear probes, floors,
the JSON table and the plot, and a rerun that reuses the finished runs instead of training again."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, TINY


@pytest.mark.slow
def test_quality_benchmark_runs_two_recipes_at_once_and_reuses_them(tmp_path):
    cmd = [sys.executable, "benchmarks/quality.py", "--recipes", "mocov3", "simsiam_bf", "--seeds", "0",
           "--holdout", "200", "--jobs", "2", "--out", str(tmp_path), "--set", *TINY, "--set", "monitor.k=20"]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("$ ") == 2  # one pretraining command per recipe
    out = tmp_path / "holdout200"
    table = json.loads((out / "quality.json").read_text())
    assert [row["recipe"] for row in table["rows"]] == ["mocov3", "simsiam_bf"]
    assert "data.holdout=200" in table["overrides"] and "monitor.k=20" in table["overrides"]  # both --set kept
    for row in table["rows"]:
        assert 0 < row["knn_top1"][0] <= 100 and 0 < row["linear_top1"][0] <= 100 and row["minutes"][0] > 0
        run = out / f"{row['recipe']}_s0"
        knn = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "knn_top1" in line]
        assert knn[-1]["knn_top1"] == row["knn_top1"][0]  # the final epoch's monitor line
        assert (out / f"{row['recipe']}_s0.log").is_file()  # the run's output, kept beside it
    assert 0 < table["floors"]["raw_pixels"] <= 100 and len(table["floors"]["random_init"]) == 1
    assert (out / "knn_over_epochs.png").stat().st_size > 0

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "$ " not in again.stdout  # nothing was trained again
    assert json.loads((out / "quality.json").read_text())["rows"] == table["rows"]
