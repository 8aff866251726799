"""Several processes under torchrun: a preemption signal that reaches one worker only, and an elastic restart after
a worker is SIGKILLed mid-epoch. Both runs end with the uninterrupted 2-process run's per-step losses and backbone
bytes (module fixture `straight`). tests/helpers/kill_at.py sends the signal / the kill from inside one rank at an
exact step, so the moment is deterministic.

A 2-process tiny run: 256 images in global batches of 64 (4 steps, one epoch), monitor off (it is not what these
tests check, and a kNN pass per run would double their time)."""

import signal

import pytest

from batchssl.checkpoint import complete_checkpoints
from helpers import DIST_ENV, REPO, free_port, rank_exit_codes, run_entry, run_pretrain, step_lines, step_losses

KILL_AT = REPO / "tests" / "helpers" / "kill_at.py"
SMALL = [
    "data.limit=256",
    "data.val_limit=200",
    "train.epochs=1",
    "train.batch_size=64",
    "train.log_every_n_steps=1",
    "monitor.enabled=false",
]


def same_run(a, b):
    assert step_lines(a) == [1, 2, 3, 4]  # every step once: the lines after the checkpoint were dropped
    assert step_losses(a) == step_losses(b)
    assert (a / "backbone.safetensors").read_bytes() == (b / "backbone.safetensors").read_bytes()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight2")
    run_pretrain([*SMALL, f"output_dir={out}"], nproc=2, env=DIST_ENV)
    return out


def test_signal_to_one_worker_stops_every_rank_at_the_same_step(tmp_path, straight):
    """SIGUSR1 to rank 1's process only (as `kill -USR1 PID` or Slurm's --signal to one task) after step 2."""
    args = [*SMALL, f"output_dir={tmp_path}"]
    stopped = run_entry(
        KILL_AT,
        "--step",
        "2",
        "--rank",
        "1",
        "--send",
        "SIGUSR1",
        *args,
        launcher="torchrun",
        check=False,
        env=DIST_ENV,
    )
    assert stopped.returncode != 0
    assert rank_exit_codes(stopped.stderr) == {0: 128 + signal.SIGUSR1, 1: 128 + signal.SIGUSR1}, stopped.stderr
    assert "Connection closed" not in stopped.stderr and "batchssl" not in stopped.stderr  # no worker traceback
    assert stopped.stdout.count("stopped by SIGUSR1 after step 2") == 1, stopped.stdout
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000002"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    resumed = run_pretrain(args, nproc=2, env=DIST_ENV)
    assert "resumed from" in resumed.stdout
    same_run(tmp_path, straight)


def test_elastic_restart_after_a_worker_is_killed_resumes_exactly(tmp_path, straight):
    """`torchrun --max-restarts 1`: rank 1 SIGKILLed after step 3 on the first attempt; the restarted group resumes
    from step_00000002 (checkpoint.every_n_steps=2) and finishes the run."""
    cmd = [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--max-restarts",
        "1",
        "--monitor-interval",
        "0.5",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        str(KILL_AT),
        "--step",
        "3",
        "--rank",
        "1",
        "--first-attempt",
        *SMALL,
        "checkpoint.every_n_steps=2",
        f"output_dir={tmp_path}",
    ]
    done = run_entry(*cmd, env={"OMP_NUM_THREADS": "1", **DIST_ENV})
    assert f"resumed from {tmp_path / 'checkpoints' / 'step_00000002'}" in done.stdout, done.stdout
    same_run(tmp_path, straight)
