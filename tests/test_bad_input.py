"""Every error a user can cause, through the real entry points' main(): one line, exit status 2, before any
expensive work, and nothing that was there before is lost. The entry points run in this process (the same main()
that `python pretrain.py` / `python -m knn_eval` call); subprocesses only where the process boundary is the point:
torch not yet imported, and a lock held by another, killed process."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from batchssl.checkpoint import LOCK_FILE, RunLock, complete_checkpoints
from helpers import REPO, TINY, load_script, main_in_process, pretrain_in_process, read_metrics, run_entry
from knn_eval.__main__ import main as knn_main
from linear_probe.__main__ import main as probe_main

TINY_RUN = [*TINY, "monitor.enabled=false"]
TRAINED = ["train.epochs=2", "checkpoint.every_n_epochs=1"]  # the `trained` run: a checkpoint after each epoch
MAINS = {
    "pretrain.py": lambda argv: load_script("pretrain.py").main(argv),
    "knn_eval": knn_main,
    "linear_probe": probe_main,
}


def one_line(stderr: str, prog: str) -> str:
    """The one `prog: error: ...` line of an exit with status 2 (checked by `refused`), and no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.strip().splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def refused(prog: str, argv) -> str:
    """`prog argv` in this process must exit with status 2 and one error line; returns that line."""
    return one_line(main_in_process(MAINS[prog], argv, expect=2), prog)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run with its knn.json and linear_probe.json results."""
    out = tmp_path_factory.mktemp("trained")
    pretrain_in_process([*TINY_RUN, *TRAINED, f"output_dir={out}"])
    main_in_process(knn_main, ["--run", out, "--k", "20"])
    main_in_process(probe_main, ["--run", out, "--epochs", "2"])
    return out


def snapshot(run_dir) -> dict:
    return {
        p.relative_to(run_dir).as_posix(): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_config_errors_come_before_torch_is_imported(tmp_path):
    """A bad key is reported without importing torch or accelerate (which take seconds to load)."""
    code = (
        "import runpy, sys\nsys.argv = ['pretrain.py', 'train.epoch=3']\ntry:\n"
        "    runpy.run_path('pretrain.py', run_name='__main__')\nexcept SystemExit as e:\n"
        "    print(e.code, 'torch' in sys.modules, 'accelerate' in sys.modules)\n"
    )
    result = run_entry("-c", code)
    assert result.stdout.split() == ["2", "False", "False"], result.stderr
    assert "unknown config key 'train.epoch'" in result.stderr


@pytest.mark.parametrize(
    "override, words",
    [
        ("output_dir=", "'output_dir' expects str"),
        ("optim.base_lr=.nan", "optim.base_lr must be a positive number"),
        ("monitor.k=0", "monitor.k must be >= 1"),
        ("data.num_workers=-3", "data.num_workers must be >= 0"),
    ],
)
def test_bad_values_are_one_line(override, words, tmp_path):
    # The bad value comes last: it is the one that counts.
    assert words in refused("pretrain.py", [f"output_dir={tmp_path}/run", override])
    assert not (tmp_path / "run").exists()


def test_empty_recipe_is_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    line = refused("pretrain.py", ["--config", empty, f"output_dir={tmp_path}/run"])
    assert "is empty" in line and not (tmp_path / "run").exists()


def test_output_dir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    line = refused("pretrain.py", [*TINY_RUN, f"output_dir={blocker}/run"])
    assert f"cannot create the run directory {blocker}/run" in line
    assert blocker.read_text() == "not a directory"


@pytest.mark.slow
def test_one_run_per_directory_and_a_killed_holder_never_blocks(tmp_path):
    out = tmp_path / "run"
    args = [*TINY_RUN, "train.epochs=200", f"output_dir={out}"]  # long: it is killed below
    # The holder is another process (a POSIX lock never blocks its own process), killed with SIGKILL.
    first = subprocess.Popen(
        [sys.executable, "pretrain.py", *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 300
        # Until the first epoch's checkpoint is out, so the evaluator finds a backbone to score and meets the lock.
        while not (out / "backbone.safetensors").is_file() and time.time() < deadline:
            time.sleep(0.1)
        second = refused("pretrain.py", args)
        evaluator = refused("knn_eval", ["--run", out])
        alive = first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert alive, "the first run ended before the second one started: the test proves nothing"
    assert f"{out} is in use by pretrain.py (pid {first.pid} on " in second
    assert f"is in use by pretrain.py (pid {first.pid}" in evaluator
    # The killed holder's lock file is still there, and blocks nothing (a short rerun: 1 epoch).
    assert (out / LOCK_FILE).is_file()
    pretrain_in_process([*TINY_RUN, "checkpoint.allow_changes=true", f"output_dir={out}"])
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert steps == sorted(set(steps))  # no line written twice


def test_stale_lock_file_does_not_block(tmp_path):
    # The lock is the kernel's, not the file's: a file left by a run that died holds nothing (the kill test above
    # reruns pretrain.py over a real one).
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text("pretrain.py (pid 999999 on elsewhere)\n")
    lock = RunLock(out, "pretrain.py").acquire()
    try:
        assert (out / LOCK_FILE).read_text().startswith(f"pretrain.py (pid {os.getpid()} on ")
    finally:
        lock.release()


@pytest.mark.slow
def test_resume_with_changed_settings_is_refused_unless_allowed(trained):
    before = snapshot(trained)
    line = refused("pretrain.py", [*TINY_RUN, "train.epochs=3", "optim.base_lr=1e30", f"output_dir={trained}"])
    assert "was trained with other settings" in line and "optim.base_lr" in line and "allow_changes" in line
    assert snapshot(trained) == before  # config.yaml still describes the checkpoints beside it
    # Settings that change neither model nor trajectory are free, and the history records each start.
    history = (trained / "config_history.jsonl").read_text().splitlines()
    assert len(history) == 1 and json.loads(history[0])["resumed_from"] is None


def copy_of(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


@pytest.mark.slow
def test_allowed_change_keeps_the_history(trained, tmp_path):
    out = copy_of(trained, tmp_path)
    pretrain_in_process([*TINY_RUN, "train.epochs=3", "checkpoint.allow_changes=true", f"output_dir={out}"])
    history = [json.loads(line) for line in (out / "config_history.jsonl").read_text().splitlines()]
    assert [h["config"]["train"]["epochs"] for h in history] == [2, 3]
    assert history[1]["resumed_from"].endswith("epoch_0002")
    assert "epochs: 3" in (out / "config.yaml").read_text()
    mode = stat.S_IMODE((out / "backbone.safetensors").stat().st_mode)
    assert mode == stat.S_IMODE((out / "config.yaml").stat().st_mode) == 0o644


@pytest.mark.slow
def test_corrupt_newest_checkpoint_names_the_way_out(trained, tmp_path):
    out = copy_of(trained, tmp_path)
    args = [*TINY_RUN, *TRAINED, f"output_dir={out}"]  # the command that made it
    older, newest = complete_checkpoints(out)
    (newest / "model.safetensors").write_bytes(b"garbage")
    line = refused("pretrain.py", args)  # the same command, as a user reruns it
    assert f"checkpoint {newest} is damaged" in line and f"checkpoint.resume={older}" in line
    assert older.is_dir() and (older / "model.safetensors").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.parametrize(
    "prog, args, words",
    [
        ("linear_probe", ["--epochs", "0"], "linear_probe: error: --epochs must be >= 1, got 0"),
        ("linear_probe", ["--epochs", "-3"], "linear_probe: error: --epochs must be >= 1, got -3"),
        ("linear_probe", ["--val-fraction", "1.5"], "linear_probe: error: --val-fraction must be in (0, 1)"),
        ("knn_eval", ["--k", "0"], "knn_eval: error: k must be >= 1"),
        ("knn_eval", ["--temperature", "0"], "knn_eval: error: temperature must be a positive number"),
    ],
)
def test_evaluator_arguments_are_checked_before_any_work(trained, prog, args, words):
    before = snapshot(trained)
    stderr = main_in_process(MAINS[prog], [*args, "--run", trained], expect=2)
    assert one_line(stderr, prog).startswith(words)
    assert "features" not in stderr and "kNN bank" not in stderr  # nothing was extracted
    assert snapshot(trained) == before  # knn.json / linear_probe.json untouched


@pytest.mark.slow
def test_results_of_other_settings_are_kept(trained):
    knn = json.loads((trained / "knn.json").read_text())
    main_in_process(knn_main, ["--run", trained, "--k", "5", "--temperature", "0.1"])
    again = json.loads((trained / "knn.json").read_text())
    assert knn["entries"].items() <= again["entries"].items()  # the earlier entry is still there, unchanged
    assert len(again["entries"]) == len(knn["entries"]) + 1 and "temperature=0.1" in again["latest"]


def _imagefolder(root, layout: dict) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for cls, files in layout.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for name in files:
                Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / name)


@pytest.mark.parametrize("case", ["no_class_folders", "empty_class", "truncated_jpeg"])
def test_imagefolder_problems_are_one_line(case, tmp_path):
    root = tmp_path / "data"
    if case == "no_class_folders":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
        (root / "train" / "loose.jpg").write_bytes(b"")
        expected = f"image folder {root / 'train'} has no class folders"
    elif case == "empty_class":
        _imagefolder(root, {"cat": ["a.png", "b.png"], "dog": []})
        expected = "no images in the class folder(s) dog"
    else:
        _imagefolder(root, {"cat": [f"{i}.jpg" for i in range(8)], "dog": [f"{i}.jpg" for i in range(8)]})
        broken = root / "train" / "dog" / "3.jpg"
        broken.write_bytes(broken.read_bytes()[:40])  # cut short
        expected = f"cannot read image {broken}"
    line = refused(
        "pretrain.py",
        [
            "data.name=imagefolder",
            f"data.root={root}",
            "data.image_size=32",
            "data.num_workers=1",
            "train.batch_size=4",
            "train.epochs=1",
            "model.width=0.25",
            "monitor.enabled=false",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    assert expected in line


def test_gpu_decode_without_cuda_is_one_line(tmp_path, monkeypatch):
    """data.decode=gpu on a machine (or a launch) without a CUDA device says what to pass, before training."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # such a machine, also where CI has a GPU
    root = tmp_path / "data"
    _imagefolder(root, {"cat": [f"{i}.jpg" for i in range(4)], "dog": [f"{i}.jpg" for i in range(4)]})
    args = ["data.name=imagefolder", f"data.root={root}", "data.image_size=32", "data.num_workers=0"]
    args += ["train.batch_size=4", "model.width=0.25", "monitor.enabled=false", f"output_dir={tmp_path / 'run'}"]
    line = refused("pretrain.py", [*args, "data.decode=gpu"])
    assert "data.decode=gpu decodes JPEGs on a CUDA training device" in line and "pass data.decode=cpu" in line
    assert not (tmp_path / "run" / "checkpoints").exists()
