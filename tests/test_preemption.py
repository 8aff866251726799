"""Step checkpoints, preemption signals, Ctrl-C and a full disk, on train() in this process (a small in-memory fake
dataset, 4 steps an epoch): a run stopped at any of these moments and rerun with the same config ends with the
uninterrupted run's per-step losses, kNN lines and backbone bytes."""

import errno
import os
import signal

import pytest
from accelerate import Accelerator

import batchssl.data as data
from batchssl.checkpoint import LOCK_FILE, RunLock, complete_checkpoints, read_state
from batchssl.config import load_config
from batchssl.errors import UserError
from batchssl.preemption import EXIT_BASE, Stopped, parse_signals
from batchssl.train import Callback, train
from helpers import REPO, fake_fashion_mnist_split, knn_lines, own_process_state, step_lines, step_losses
from helpers import SHRUNK as SHRUNK_DEFAULT

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
