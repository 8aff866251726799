"""Exact resume as users run it: every Fashion-MNIST recipe with its own loader settings, killed at an exact moment
(tests/helpers/kill_at.py: a train() callback that SIGKILLs its own process) or at random moments (SIGKILL from
outside), then rerun with the very same command: the per-step losses, the kNN lines and the final backbone equal
the uninterrupted run's exactly.

The process boundary is what a kill tests, so the killed runs are real processes; the uninterrupted references and
the reruns after a kill at an exact moment are the same train() in this process (no seconds of imports), on the
killed processes' thread count."""

import io
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout

import pytest

from batchssl.checkpoint import complete_checkpoints
from helpers import REPO, pretrain_in_process, read_metrics, run_pretrain, step_losses

KILL_AT = REPO / "tests" / "helpers" / "kill_at.py"

# Small but real: the recipe's own pipeline and loader workers, 3 epochs of 2 steps, a checkpoint and a kNN line
# every epoch (the kNN bank keeps 256 images: monitor.k is 200).
SHORT = [
    "data.limit=256",
    "data.pretrain_limit=128",
    "data.val_limit=200",
    "train.epochs=3",
    "train.batch_size=64",
    "train.log_every_n_steps=1",
    "monitor.batch_size=256",
    "monitor.every_n_epochs=1",
    "checkpoint.every_n_epochs=1",
    "checkpoint.keep_last=5",
]


# CPU threads of every run here, killed or not: the last bits of a loss depend on the thread count, so the runs in
# this process must use the killed processes' count. Two, as a plain `python pretrain.py` takes on a 2-core machine.
THREADS = 2


def killed_at(when: str, n: int, args) -> subprocess.CompletedProcess:
    """pretrain.py with the same arguments in a process that SIGKILLs itself at step n / in epoch n's checkpoint."""
    return subprocess.run(
        [sys.executable, str(KILL_AT), f"--{when}", str(n), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": str(THREADS)},
    )


def rerun(args) -> str:
    """The same command again, as the user reruns it after a kill, in this process; returns what it printed."""
    out = io.StringIO()
    with redirect_stdout(out):
        pretrain_in_process(args, threads=THREADS)
    return out.getvalue()


def without_timings(run) -> list[dict]:
    """metrics.jsonl without the wall-clock numbers, which no two runs share."""
    return [{k: v for k, v in m.items() if k not in ("images_per_s", "knn_seconds")} for m in read_metrics(run)]


def knn_lines(run) -> list[tuple[int, float]]:
    return [(m["epoch"], m["knn_top1"]) for m in read_metrics(run) if "knn_top1" in m]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted reference run of a command, in this process, made once per module for the tests that share
    it (mocov3_bf's is the reference of both the mid-epoch and the mid-checkpoint kill): returns its output
    directory."""
    made = {}

    def run(args):
        key = tuple(args)
        if key not in made:
            made[key] = tmp_path_factory.mktemp("straight")
            pretrain_in_process([*args, f"output_dir={made[key]}"], threads=THREADS)
        return made[key]

    return run


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, extra",
    [
        # The four Fashion-MNIST recipes share their loader settings (data.pipeline auto -> views on the device,
        # data.num_workers 1 for the monitor): both methods, with and without BatchFormer (its dropout draws random
        # numbers), are covered by these two and by the stress test below (simsiam_bf).
        ("simsiam", []),
        ("mocov3_bf", []),
        # The lightly path in a loader worker (ImageFolder's pipeline), where BatchFormer's dropout once drifted.
        ("simsiam_bf", ["data.pipeline=workers", "data.num_workers=1"]),
    ],
)
def test_killed_mid_epoch_resumes_exactly(recipe, extra, tmp_path, straight_run):
    args = ["--config", f"recipes/fashion_mnist/{recipe}.yaml", *SHORT, *extra]
    reference = straight_run(args)

    killed = tmp_path / "killed"
    died = killed_at("step", 3, [*args, f"output_dir={killed}"])
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    assert [p.name for p in complete_checkpoints(killed)] == ["epoch_0001"]
    assert max(step_losses(killed)) == 3  # it did run into epoch 2 (steps 3 and 4) before it died
    resumed = rerun([*args, f"output_dir={killed}"])
    assert f"resumed from {killed / 'checkpoints' / 'epoch_0001'} (epoch 1)" in resumed.splitlines()

    straight = step_losses(reference)
    assert sorted(straight) == list(range(1, 7))
    assert step_losses(killed) == straight  # every step once, bit for bit
    assert [m["step"] for m in read_metrics(killed) if "loss" in m] == list(range(1, 7))
    assert knn_lines(killed) == knn_lines(reference) and len(knn_lines(killed)) == 3
    # Exactly the uninterrupted run, line by line: losses, lr, z_std, loss_bf, kNN (the monitor's draws included).
    assert without_timings(killed) == without_timings(reference)
    assert (killed / "backbone.safetensors").read_bytes() == (reference / "backbone.safetensors").read_bytes()


@pytest.mark.slow
def test_killed_while_writing_a_checkpoint_resumes_exactly(tmp_path, straight_run):
    args = ["--config", "recipes/fashion_mnist/mocov3_bf.yaml", *SHORT]
    reference = straight_run(args)
    killed = tmp_path / "killed"
    died = killed_at("checkpoint", 2, [*args, f"output_dir={killed}"])
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    assert [p.name for p in complete_checkpoints(killed)] == ["epoch_0001"]  # the half-written one does not count
    assert (killed / "checkpoints" / ".tmp-epoch_0002").is_dir()
    rerun([*args, f"output_dir={killed}"])
    assert step_losses(killed) == step_losses(reference)
    assert knn_lines(killed) == knn_lines(reference)
    assert (killed / "backbone.safetensors").read_bytes() == (reference / "backbone.safetensors").read_bytes()


@pytest.mark.slow
def test_random_kills_end_bit_identical(tmp_path):
    """SIGKILL from outside at random moments (start-up, steps, the monitor, checkpoint writing, export), rerun
    after each; the run that finally completes leaves the same bytes as one that was never interrupted. Five kills
    (ten took 195 s of a 21-minute suite); the moments that matter most are also hit on purpose by the tests
    above (mid-epoch, while writing a checkpoint)."""
    args = ["--config", "recipes/fashion_mnist/simsiam_bf.yaml", *SHORT]
    start = time.perf_counter()
    run_pretrain([*args, f"output_dir={tmp_path / 'straight'}"])
    duration = time.perf_counter() - start
    run = tmp_path / "killed"
    rng = random.Random(0)  # the moments vary with the machine's speed; the assertion holds for any of them
    kills = 0
    attempts = 0
    while kills < 5 and attempts < 15:  # 5 real kills; a rerun that resumes late may finish before its moment
        attempts += 1
        proc = subprocess.Popen(
            [sys.executable, "pretrain.py", *args, f"output_dir={run}"],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            proc.wait(timeout=rng.uniform(0.1, 0.9) * duration)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        else:  # it completed: start over in a fresh directory, so the next kills hit a run again
            assert proc.returncode == 0, f"a rerun after a kill failed ({proc.returncode})"
            assert step_losses(run) == step_losses(tmp_path / "straight")
            shutil.rmtree(run)
    run_pretrain([*args, f"output_dir={run}"])
    assert kills == 5
    assert step_losses(run) == step_losses(tmp_path / "straight")
    assert knn_lines(run) == knn_lines(tmp_path / "straight")
    assert (run / "backbone.safetensors").read_bytes() == (tmp_path / "straight" / "backbone.safetensors").read_bytes()
