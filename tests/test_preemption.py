"""Step checkpoints, preemption signals, Ctrl-C and a full disk, on train() in this process (a small in-memory fake
dataset, 4 steps an epoch): a run stopped at any of these moments and rerun with the same config ends with the
uninterrupted run's per-step losses, kNN lines and backbone bytes. checkpoint.requeue runs a stub `scontrol`
(tests/test_slurm.py's). Two processes under torchrun only where that is what is checked: a full disk on one rank
(tests/helpers/full_disk_at.py) stops every rank with one line."""

import errno
import os
import signal

import pytest
from accelerate import Accelerator
from safetensors import SafetensorError

import batchssl.data as data
from batchssl.checkpoint import LOCK_FILE, RunLock, complete_checkpoints, latest_checkpoint, read_state
from batchssl.config import load_config
from batchssl.errors import UserError
from batchssl.preemption import EXIT_BASE, Stopped, parse_signals
from batchssl.train import Callback, train
from helpers import (
    DIST_ENV,
    REPO,
    TINY,
    fake_fashion_mnist_split,
    knn_lines,
    own_process_state,
    rank_exit_codes,
    run_entry,
    step_lines,
    step_losses,
)
from helpers import SHRUNK as SHRUNK_DEFAULT
from helpers.slurm_stubs import install_stubs

# 64 fake images in batches of 16: 4 steps an epoch, 2 epochs, a kNN line and an epoch checkpoint each epoch.
SHRUNK = [
    *SHRUNK_DEFAULT,
    "monitor.every_n_epochs=1",
    "checkpoint.every_n_epochs=1",
    "checkpoint.keep_last=10",
]


fake_split = fake_fashion_mnist_split(64)


@pytest.fixture
def fake_data(monkeypatch):
    monkeypatch.setattr(data, "load_split", fake_split)


def run(out, *extra, callbacks=()):
    cfg = load_config(REPO / "recipes" / "fashion_mnist" / "mocov3_bf.yaml", [*SHRUNK, *extra, f"output_dir={out}"])
    with own_process_state():
        return train(cfg, callbacks=callbacks)


class Raise(Callback):
    """Stands in for a crash right after global step `at`."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, step, logged):
        if step == self.at:
            raise RuntimeError("crash")


class Signal(Callback):
    """Sends this process `sig` (`times` times) right after step `at`, or while a checkpoint is staged."""

    def __init__(self, sig, at: int | None = None, times: int = 1, staged: bool = False):
        self.sig, self.at, self.times, self.staged = sig, at, times, staged

    def on_step_end(self, step, logged):
        if step == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), self.sig)

    def on_checkpoint_staged(self, path):
        if self.staged:
            os.kill(os.getpid(), self.sig)


def same_run(a, b):
    assert step_lines(a) == list(range(1, 9))  # every step once
    assert step_losses(a) == step_losses(b)
    assert knn_lines(a) == knn_lines(b) and len(knn_lines(a)) == 2
    assert (a / "backbone.safetensors").read_bytes() == (b / "backbone.safetensors").read_bytes()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run, made once for the module (its own fake data)."""
    out = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "load_split", fake_split)
        run(out)
    return out


def test_step_checkpoints_resume_mid_epoch_exactly(tmp_path, fake_data, straight):
    with pytest.raises(RuntimeError, match="crash"):
        run(tmp_path, "checkpoint.every_n_steps=3", callbacks=[Raise(7)])
    # Ordered by global step: step 3, epoch 1 (step 4), step 6; the crash came after step 7.
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000003", "epoch_0001", "step_00000006"]
    assert read_state(tmp_path / "checkpoints" / "step_00000006")["epoch"] == 1  # written inside epoch 2 (index 1)
    run(tmp_path, "checkpoint.every_n_steps=3")  # resumes at step 7, the pipeline starting at the epoch's step 2
    same_run(tmp_path, straight)
    names = [p.name for p in complete_checkpoints(tmp_path)]
    assert names == ["step_00000003", "epoch_0001", "step_00000006", "epoch_0002"]


def test_keep_last_counts_both_kinds(tmp_path, fake_data):
    run(tmp_path, "checkpoint.every_n_steps=1", "checkpoint.keep_last=3", "monitor.enabled=false")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000006", "step_00000007", "epoch_0002"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_checkpoints_exits_and_resumes_exactly(sig, tmp_path, fake_data, straight):
    # Sent twice (Slurm + torchrun's forwarding): one checkpoint, one exit.
    with pytest.raises(Stopped) as stopped:
        run(tmp_path, callbacks=[Signal(sig, at=6, times=2)])
    assert stopped.value.code == EXIT_BASE + sig == (143 if sig == signal.SIGTERM else 138)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["epoch_0001", "step_00000006"]
    assert max(step_losses(tmp_path)) == 6
    RunLock(tmp_path, "test").acquire().release()  # the lock was released
    assert signal.getsignal(sig) is not None and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    run(tmp_path)
    same_run(tmp_path, straight)


def test_signal_after_an_epochs_last_step_resumes_with_its_monitor_line(tmp_path, fake_data, straight):
    with pytest.raises(Stopped):
        run(tmp_path, callbacks=[Signal(signal.SIGTERM, at=4)])
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000004"]  # before epoch 1's monitor
    assert knn_lines(tmp_path) == []
    run(tmp_path)
    same_run(tmp_path, straight)


def test_signal_while_writing_a_checkpoint_is_ignored(tmp_path, fake_data, straight):
    # SIGTERM while epoch 1's checkpoint is staged: the checkpoint completes, the run stops after the next step.
    with pytest.raises(Stopped):
        run(tmp_path, callbacks=[Signal(signal.SIGTERM, staged=True)])
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["epoch_0001", "step_00000005"]
    run(tmp_path)
    same_run(tmp_path, straight)


def test_ctrl_c_stops_with_a_checkpoint_and_a_second_stops_at_once(tmp_path, fake_data, straight, capsys):
    with pytest.raises(Stopped) as stopped:
        run(tmp_path, callbacks=[Signal(signal.SIGINT, at=2)])
    assert stopped.value.code == 130
    assert "stopped by SIGINT after step 2" in capsys.readouterr().out
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000002"]
    with pytest.raises(Stopped) as stopped:  # twice at step 7: the second raises in the step, no checkpoint
        run(tmp_path, callbacks=[Signal(signal.SIGINT, at=7, times=2)])
    assert stopped.value.code == 130 and "interrupted" in stopped.value.message
    assert complete_checkpoints(tmp_path)[-1].name == "epoch_0001"
    run(tmp_path)
    same_run(tmp_path, straight)


def test_full_disk_during_a_checkpoint_one_line_previous_intact(tmp_path, fake_data, monkeypatch):
    original = Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        if "epoch_0002" in str(output_dir):
            (tmp_path / "checkpoints" / ".tmp-epoch_0002" / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    with pytest.raises(UserError) as err:
        run(tmp_path)
    message = str(err.value)
    assert message.startswith(f"no space left in {tmp_path / 'checkpoints'}: a checkpoint needs about ")
    assert "epoch_0001 is intact" in message and "\n" not in message
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch_0001"]  # the partial one removed
    assert not (tmp_path / LOCK_FILE).exists() or RunLock(tmp_path, "test").acquire().release() is None


def test_full_disk_while_appending_metrics_one_line_then_resumes_exactly(tmp_path, fake_data, straight, monkeypatch):
    """The disk fills up while metrics.jsonl gets step 6's line: half the line is written, then ENOSPC. The run
    stops with one line naming the intact checkpoint; once there is space, the same command ends as the
    uninterrupted run (the half line dropped, steps 5-6 logged once)."""
    from pathlib import Path

    real_open, failed = Path.open, []

    def open_(self, mode="r", *args, **kwargs):
        f = real_open(self, mode, *args, **kwargs)
        if self.name == "metrics.jsonl" and mode == "a" and len(step_lines(self.parent)) == 5 and not failed:
            failed.append(True)
            f.write('{"epoch": 2, "st')
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return f

    monkeypatch.setattr(Path, "open", open_)
    with pytest.raises(UserError) as err:
        run(tmp_path)
    monkeypatch.setattr(Path, "open", real_open)
    message = str(err.value)
    assert message.startswith(f"no space left in {tmp_path}: ") and "\n" not in message
    assert "the checkpoint epoch_0001 is complete" in message
    RunLock(tmp_path, "test").acquire().release()
    run(tmp_path)
    same_run(tmp_path, straight)


def _write_on_main_of_two(rank: int, directory: str, results) -> None:
    """One of two gloo processes: rank 0's append to metrics.jsonl fails with ENOSPC inside write_on_main."""
    import torch.distributed as dist

    from batchssl.checkpoint import CheckpointWriteError, write_on_main

    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=2)

    class Accel:  # what write_on_main reads of an Accelerator
        num_processes, process_index, is_main_process = 2, rank, rank == 0

    def append():
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        write_on_main(Accel(), append, f"{directory}/metrics.jsonl", need=100)
        results.put((rank, "returned"))
    except CheckpointWriteError as err:
        results.put((rank, (str(err), err.quiet)))
    finally:
        dist.destroy_process_group()


def test_write_on_main_failure_on_rank_0_raises_the_same_line_on_both_ranks(tmp_path):
    """The agreement behind metrics.jsonl and the backbone export: only rank 0 writes, and its failure reaches rank
    1 (no hang at the next collective), with one message, quiet on rank 1."""
    import multiprocessing

    import torch.multiprocessing as mp

    results = multiprocessing.get_context("fork").SimpleQueue()
    mp.start_processes(_write_on_main_of_two, args=(str(tmp_path), results), nprocs=2, start_method="fork")
    by_rank = dict(results.get() for _ in range(2))
    (line0, quiet0), (line1, quiet1) = by_rank[0], by_rank[1]
    assert line0 == line1 and line0.startswith(f"no space left in {tmp_path}: ") and "no checkpoint exists" in line0
    assert (quiet0, quiet1) == (False, True)


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 0])
def test_full_disk_on_one_rank_of_two_stops_every_rank_with_one_line(rank, tmp_path):
    """Rank `rank`'s write of the second step checkpoint fails with ENOSPC (rank 1: its RNG file; rank 0: the model
    file): both ranks exit 2 (none killed by torchrun, no hang until the group's timeout), the run prints the line
    once, the partial directory is gone, the first checkpoint is intact and the newest, the run lock is released."""
    args = [*TINY, "monitor.enabled=false", "checkpoint.every_n_steps=1", f"output_dir={tmp_path}"]
    script = REPO / "tests" / "helpers" / "full_disk_at.py"
    failed = run_entry(
        script, "--checkpoint", "step_00000002", "--rank", rank, *args, launcher="torchrun", check=False, env=DIST_ENV
    )
    assert rank_exit_codes(failed.stderr) == {0: 2, 1: 2}, failed.stderr[-3000:]
    errors = [line for line in failed.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, failed.stderr[-3000:]
    assert errors[0].startswith(f"pretrain.py: error: no space left in {tmp_path / 'checkpoints'}: a checkpoint ")
    assert "the newest complete checkpoint step_00000001 is intact" in errors[0]
    assert "Connection closed" not in failed.stderr and "batchssl" not in failed.stderr  # no worker traceback
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]  # no .tmp-step_00000002
    RunLock(tmp_path, "test").acquire().release()
    assert latest_checkpoint(tmp_path).name == "step_00000001"  # what a rerun resumes from (test_elastic reruns)


def test_full_disk_while_exporting_the_backbone_one_line(tmp_path, fake_data, monkeypatch):
    import batchssl.checkpoint as ckpt

    def save_file(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_file", save_file)
    with pytest.raises(ckpt.CheckpointWriteError) as err:
        run(tmp_path, "train.epochs=1", "monitor.enabled=false")
    assert str(err.value).startswith(f"no space left in {tmp_path}: ")
    assert "the checkpoint epoch_0001 is complete" in str(err.value) and not err.value.quiet
    assert not list(tmp_path.glob(".tmp-*")) and not (tmp_path / "backbone.safetensors").exists()


def test_checkpoint_write_failure_kinds():
    """What a full disk raises through each writer: OSError, safetensors' error, torch.save's errno-less one."""
    import errno as errno_

    from batchssl.checkpoint import _failure_line, _io_error

    assert _io_error(OSError(errno_.EDQUOT, "Disk quota exceeded")).errno == errno_.EDQUOT
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert _io_error(full).errno == errno_.ENOSPC
    assert _io_error(SafetensorError("invalid dtype")) is None and _io_error(RuntimeError("shape")) is None
    torch_full = _io_error(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"))
    assert torch_full.errno is None  # the disk's free space decides: less than a checkpoint's size is a full disk
    where = REPO  # a directory with some space free
    assert _failure_line(torch_full, where, "a checkpoint", 2**60, "kept").startswith(f"no space left in {where}: ")
    assert _failure_line(torch_full, where, "a checkpoint", 0, "kept").startswith(
        f"cannot write a checkpoint in {where}: [enforce fail at inline_container.cc:672]"
    )


@pytest.mark.parametrize(
    ("job", "fail", "said"),
    [
        ("4242", "", "; requeued Slurm job 4242"),
        (
            "4242",
            "slurm_requeue error: Access/permission denied",
            "; scontrol requeue 4242 failed (slurm_requeue error: Access/permission denied); requeue it by hand",
        ),
        (None, "", "; checkpoint.requeue=true but SLURM_JOB_ID is not set (not a Slurm job): not requeued"),
    ],
)
def test_requeue_after_a_signal_s_checkpoint(job, fail, said, tmp_path, fake_data, monkeypatch, capsys):
    """checkpoint.requeue=true under Slurm (SLURM_JOB_ID): SIGUSR1 (sbatch --signal=USR1@120) at step 2 checkpoints,
    runs `scontrol requeue $SLURM_JOB_ID` (a stub on PATH) and exits 138 whatever scontrol does."""
    log = tmp_path / "calls.log"
    monkeypatch.setenv("PATH", f"{install_stubs(tmp_path / 'bin')}:{os.environ['PATH']}")
    monkeypatch.setenv("STUB_LOG", str(log))
    monkeypatch.setenv("STUB_SCONTROL_FAIL", fail)
    if job is None:
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    else:
        monkeypatch.setenv("SLURM_JOB_ID", job)
    out = tmp_path / "run"
    with pytest.raises(Stopped) as stopped:
        run(
            out,
            "checkpoint.requeue=true",
            "train.epochs=1",
            "monitor.enabled=false",
            callbacks=[Signal(signal.SIGUSR1, at=2)],
        )
    assert stopped.value.code == 138
    step = out / "checkpoints" / "step_00000002"
    assert stopped.value.message == (
        f"stopped by SIGUSR1 after step 2: checkpoint {step}; rerun the same command to resume{said}"
    )
    assert stopped.value.message in capsys.readouterr().out
    assert [p.name for p in complete_checkpoints(out)] == ["step_00000002"]
    assert (log.read_text().splitlines() if log.exists() else []) == ([f"scontrol requeue {job}"] if job else [])


def test_bad_signal_names_are_one_line():
    assert parse_signals("SIGTERM, usr1") == [signal.SIGTERM, signal.SIGUSR1]
    with pytest.raises(UserError, match="SIGKILL cannot be handled"):
        parse_signals("SIGKILL")
    with pytest.raises(UserError, match="SIGNOPE"):
        parse_signals("NOPE")


def test_step_checkpoint_with_loader_workers_resumes_exactly(tmp_path, fake_data):
    """data.pipeline=workers: the sampler starts the epoch at the checkpoint's step."""
    workers = ["data.pipeline=workers", "data.num_workers=0", "monitor.enabled=false"]
    run(tmp_path / "straight", *workers)
    with pytest.raises(RuntimeError, match="crash"):
        run(tmp_path / "crashed", *workers, "checkpoint.every_n_steps=2", callbacks=[Raise(7)])
    assert complete_checkpoints(tmp_path / "crashed")[-1].name == "step_00000006"
    run(tmp_path / "crashed", *workers, "checkpoint.every_n_steps=2")
    assert step_lines(tmp_path / "crashed") == list(range(1, 9))
    assert step_losses(tmp_path / "crashed") == step_losses(tmp_path / "straight")
    assert (tmp_path / "crashed" / "backbone.safetensors").read_bytes() == (
        tmp_path / "straight" / "backbone.safetensors"
    ).read_bytes()


def test_online_probe_trains_on_the_global_views_only(tmp_path, fake_data, monkeypatch):
    from batchssl.online_linear import OnlineLinear

    rows = []
    original = OnlineLinear.train_step

    def train_step(self, features, labels, *args):
        rows.append(len(features))
        return original(self, features, labels, *args)

    monkeypatch.setattr(OnlineLinear, "train_step", train_step)
    run(tmp_path, "augment.local_crops=2", "augment.local_size=8", "train.epochs=1", "monitor.every_n_epochs=0")
    assert rows == [2 * 16] * 4  # two global views of 16 images a step, no local crops
