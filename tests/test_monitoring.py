"""What a user sees of a run: the thread count under `accelerate launch`, `--plan`, the online linear probe
(which must not change pretraining), the collapse alarm."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, TINY, read_metrics, step_losses

ACCELERATE = [str(Path(sys.executable).parent / "accelerate"), "launch"]  # the README's `accelerate launch`
PLAN = ["pretrain.py", "--plan", *TINY]


def launch(args, env=None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    environment.update(env or {})
    return subprocess.run(ACCELERATE + args, cwd=REPO, capture_output=True, text=True, timeout=600, env=environment)


def threads_line(result) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return next(line for line in result.stdout.splitlines() if line.strip().startswith("device"))


@pytest.mark.slow
def test_accelerate_launch_uses_all_cores_unless_told_otherwise():
    cores = os.cpu_count()
    plain = launch(["--num_processes", "1", *PLAN])
    assert f"{cores} CPU threads each" in threads_line(plain)
    # The user's choice stands: OMP_NUM_THREADS in the launcher's environment, or Accelerate's own flag.
    assert "1 CPU threads each" in threads_line(launch(["--num_processes", "1", *PLAN], {"OMP_NUM_THREADS": "1"}))
    assert "1 CPU threads each" in threads_line(launch(["--num_processes", "1", "--num_cpu_threads_per_process", "1",
                                                        *PLAN]))


@pytest.mark.slow
def test_plan_prints_the_derived_numbers(tmp_path):
    result = subprocess.run([sys.executable, *PLAN, "train.epochs=3", f"output_dir={tmp_path / 'run'}"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    # The default recipe at 256 images, batch 64: 4 steps per epoch, peak lr 0.3 * 64 / 256, 0.5 warmup epochs.
    assert "64 global, 64 per process" in out and "peak 0.075" in out and "warmup 2 steps" in out
    assert "then constant; MoCo momentum constant 0.99" in out  # the default recipe's schedule ends
    assert "4 per epoch x 3 epochs = 12" in out
    assert "backbone 0.700 M" in out and "batchformer" in out and "momentum encoder" in out
    assert "s / step" in out and "GiB" in out
    assert not (tmp_path / "run").exists()  # a plan writes nothing


@pytest.mark.slow
def test_online_linear_probe_leaves_pretraining_unchanged(tmp_path):
    common = [sys.executable, "pretrain.py", "--config", "recipes/fashion_mnist/mocov3_bf.yaml", *TINY]
    for name, flag in (("on", "true"), ("off", "false")):
        result = subprocess.run([*common, f"monitor.online_linear={flag}", f"output_dir={tmp_path / name}"],
                                cwd=REPO, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    assert step_losses(tmp_path / "on") == step_losses(tmp_path / "off")  # bit for bit, every step
    assert (tmp_path / "on" / "backbone.safetensors").read_bytes() == \
        (tmp_path / "off" / "backbone.safetensors").read_bytes()
    monitor_on = [m for m in read_metrics(tmp_path / "on") if "knn_top1" in m][-1]
    monitor_off = [m for m in read_metrics(tmp_path / "off") if "knn_top1" in m][-1]
    assert 10.0 < monitor_on["online_top1"] <= 100.0 and "online_top1" not in monitor_off
    assert monitor_on["knn_top1"] == monitor_off["knn_top1"]


@pytest.mark.slow
def test_collapse_alarm_fires_once_and_flags_the_step(tmp_path):
    """The alarm's wiring on a real run: with the threshold raised to 2 / sqrt(d) every logged z_std of a healthy
    run (about 1 / sqrt(d)) counts as collapsed, so the alarm must fire exactly once, at the 3rd logged step.
    (A real collapse cannot be forced in a few steps: the projector's non-affine output BN holds z_std near
    1 / sqrt(d) until the whole network has degenerated; batchssl.collapse's tests cover the detector itself.)"""
    result = subprocess.run([sys.executable, "pretrain.py", *TINY, "monitor.collapse_fraction=2",
                             "monitor.collapse_patience=3", "monitor.enabled=false", f"output_dir={tmp_path}"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("collapse alarm:") == 1
    steps = [m for m in read_metrics(tmp_path) if "loss" in m]
    assert [m["step"] for m in steps if m.get("collapse_alarm")] == [3]
    assert all(m["z_std"] < 2 / 128 ** 0.5 for m in steps)
