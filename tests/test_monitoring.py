"""What a user sees of a run: the thread count under `accelerate launch`, `--plan`, the online linear probe
(which must not change pretraining), the collapse alarm."""

import math
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers import (
    SHRUNK,
    TINY,
    load_script,
    main_in_process,
    pretrain_in_process,
    read_metrics,
    run_entry,
    step_losses,
)

PLAN = ["pretrain.py", "--plan", *TINY]
# What the launches below read is the thread count, set before anything is built: the default recipe (its pipeline
# and loader settings, which the count depends on) shrunk to 2 steps of 16 small images, so its plan is quick.
LAUNCHED_PLAN = ["pretrain.py", "--plan", *SHRUNK, "data.limit=32", "data.val_limit=32"]


def threads_line(result) -> str:
    return next(line for line in result.stdout.splitlines() if line.strip().startswith("device"))


@pytest.mark.slow
def test_accelerate_launch_uses_all_cores_unless_told_otherwise():
    # The README's `accelerate launch`, a real launcher process: what it sets in its children is the point. The
    # three launches are independent (each child reads only its own launcher), so they run at once: most of each is
    # imports on one core.
    def launch(*flags, omp):
        return run_entry(
            "--num_processes", "1", *flags, *LAUNCHED_PLAN, launcher="accelerate", env={"OMP_NUM_THREADS": omp}
        )

    with ThreadPoolExecutor(3) as pool:
        plain = pool.submit(launch, omp=None)
        # The user's choice stands: OMP_NUM_THREADS in the launcher's environment, or Accelerate's own flag.
        told = pool.submit(launch, omp="1")
        flag = pool.submit(launch, "--num_cpu_threads_per_process", "1", omp=None)
        plain, told, flag = plain.result(), told.result(), flag.result()
    assert f"{os.cpu_count()} CPU threads each" in threads_line(plain)
    assert "1 CPU threads each" in threads_line(told)
    assert "1 CPU threads each" in threads_line(flag)


@pytest.mark.slow
def test_plan_prints_the_derived_numbers(tmp_path, capsys):
    main_in_process(load_script("pretrain.py").main, [*PLAN[1:], "train.epochs=3", f"output_dir={tmp_path / 'run'}"])
    out = capsys.readouterr().out
    # The default recipe at 256 images, batch 64: 4 steps per epoch, peak lr 0.3 * 64 / 256, 0.5 warmup epochs.
    assert "64 global, 64 per process" in out and "peak 0.075" in out and "warmup 2 steps" in out
    assert "then constant; MoCo momentum constant 0.99" in out  # the default recipe's schedule ends
    assert "4 per epoch x 3 epochs = 12" in out
    assert "backbone 0.700 M" in out and "batchformer" in out and "momentum encoder" in out
    assert "s / step" in out and "GiB" in out
    assert not (tmp_path / "run").exists()  # a plan writes nothing


@pytest.mark.slow
def test_online_linear_probe_leaves_pretraining_unchanged(tiny_run, tmp_path):
    # tiny_run: the default recipe, its online probe on; the same run with the probe off beside it.
    on, off = tiny_run.path, tmp_path / "off"
    pretrain_in_process([*TINY, "monitor.online_linear=false", f"output_dir={off}"])
    # What the test exists for: the probe changes nothing of pretraining, bit for bit.
    assert step_losses(on) == step_losses(off)
    assert (on / "backbone.safetensors").read_bytes() == (off / "backbone.safetensors").read_bytes()
    monitor_on = [m for m in read_metrics(on) if "knn_top1" in m][-1]
    monitor_off = [m for m in read_metrics(off) if "knn_top1" in m][-1]
    assert monitor_on["knn_top1"] == monitor_off["knn_top1"]
    # The probe was trained at each of the 4 steps and scored; its accuracy after 4 steps is whatever the
    # machine's kernels make of them (no threshold), but a number, and top-5 contains top-1.
    probe = tiny_run.online_probe
    assert probe.norm.num_batches_tracked.item() == 4
    assert torch.isfinite(probe.linear.weight).all() and not torch.equal(probe.linear.weight, tiny_run.probe_start)
    assert 0.0 <= monitor_on["online_top1"] <= monitor_on["online_top5"] <= 100.0
    assert math.isfinite(monitor_on["online_top1"]) and "online_top1" not in monitor_off


@pytest.mark.slow
def test_collapse_alarm_fires_once_and_flags_the_step(tmp_path, capsys):
    """The alarm's wiring on a real run: with the threshold raised to 2 / sqrt(d) every logged z_std of a healthy
    run (about 1 / sqrt(d)) counts as collapsed, so the alarm must fire exactly once, at the 3rd logged step.
    (A real collapse cannot be forced in a few steps: the projector's non-affine output BN holds z_std near
    1 / sqrt(d) until the whole network has degenerated; batchssl.collapse's tests cover the detector itself.)"""
    pretrain_in_process(
        [
            *TINY,
            "monitor.collapse_fraction=2",
            "monitor.collapse_patience=3",
            "monitor.enabled=false",
            f"output_dir={tmp_path}",
        ]
    )
    assert capsys.readouterr().out.count("collapse alarm:") == 1
    steps = [m for m in read_metrics(tmp_path) if "loss" in m]
    assert [m["step"] for m in steps if m.get("collapse_alarm")] == [3]
    assert all(m["z_std"] < 2 / 128**0.5 for m in steps)
