"""Every error a user can cause, through the real entry points: one line, exit status 2, before any expensive work,
and nothing that was there before is lost."""

import json
import signal
import stat
import subprocess
import sys
import time

import pytest

from batchssl.checkpoint import complete_checkpoints
from helpers import REPO, TINY, read_metrics

TINY_RUN = [*TINY, "monitor.enabled=false"]


def run(args, check=False, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def one_line(result, prog: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run with its knn.json and linear_probe.json results."""
    out = tmp_path_factory.mktemp("trained")
    assert run(["pretrain.py", *TINY_RUN, "train.epochs=2", "checkpoint.every_n_epochs=1",
                f"output_dir={out}"]).returncode == 0
    assert run(["-m", "knn_eval", "--run", str(out), "--k", "20"]).returncode == 0
    assert run(["-m", "linear_probe", "--run", str(out), "--epochs", "2"]).returncode == 0
    return out


def snapshot(run_dir) -> dict:
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_config_errors_come_before_torch_is_imported(tmp_path):
    """A bad key is reported without importing torch or accelerate (which take seconds to load)."""
    code = ("import runpy, sys\nsys.argv = ['pretrain.py', 'train.epoch=3']\ntry:\n"
            "    runpy.run_path('pretrain.py', run_name='__main__')\nexcept SystemExit as e:\n"
            "    print(e.code, 'torch' in sys.modules, 'accelerate' in sys.modules)\n")
    result = run(["-c", code])
    assert result.stdout.split() == ["2", "False", "False"], result.stderr
    assert "unknown config key 'train.epoch'" in result.stderr


@pytest.mark.parametrize("override, words", [
    ("output_dir=", "'output_dir' expects str"),
    ("optim.base_lr=.nan", "optim.base_lr must be a positive number"),
    ("monitor.k=0", "monitor.k must be >= 1"),
    ("data.num_workers=-3", "data.num_workers must be >= 0"),
])
def test_bad_values_are_one_line(override, words, tmp_path):
    # The bad value comes last: it is the one that counts.
    assert words in one_line(run(["pretrain.py", f"output_dir={tmp_path}/run", override]), "pretrain.py")
    assert not (tmp_path / "run").exists()


def test_empty_recipe_is_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    line = one_line(run(["pretrain.py", "--config", str(empty), f"output_dir={tmp_path}/run"]), "pretrain.py")
    assert "is empty" in line and not (tmp_path / "run").exists()


def test_output_dir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    line = one_line(run(["pretrain.py", *TINY_RUN, f"output_dir={blocker}/run"]), "pretrain.py")
    assert f"cannot create the run directory {blocker}/run" in line
    assert blocker.read_text() == "not a directory"


@pytest.mark.slow
def test_one_run_per_directory_and_a_killed_holder_never_blocks(tmp_path):
    out = tmp_path / "run"
    args = ["pretrain.py", *TINY_RUN, "train.epochs=200", f"output_dir={out}"]  # long: it is killed below
    first = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        # Until the first epoch's checkpoint is out, so the evaluator finds a backbone to score and meets the lock.
        while not (out / "backbone.safetensors").is_file() and time.time() < deadline:
            time.sleep(0.1)
        second = run(args)
        evaluator = run(["-m", "knn_eval", "--run", str(out)])
        alive = first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert alive, "the first run ended before the second one started: the test proves nothing"
    line = one_line(second, "pretrain.py")
    assert f"{out} is in use by pretrain.py (pid {first.pid} on " in line
    assert f"is in use by pretrain.py (pid {first.pid}" in one_line(evaluator, "knn_eval")
    # The killed holder's lock file is still there, and blocks nothing (a short rerun: 1 epoch).
    assert (out / ".lock").is_file()
    rerun = run(["pretrain.py", *TINY_RUN, "checkpoint.allow_changes=true", f"output_dir={out}"])
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert steps == sorted(set(steps))  # no line written twice


def test_stale_lock_file_does_not_block(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("pretrain.py (pid 999999 on elsewhere)\n")  # left by a run that died
    assert run(["pretrain.py", *TINY_RUN, f"output_dir={out}"]).returncode == 0


@pytest.mark.slow
def test_resume_with_changed_settings_is_refused_unless_allowed(trained):
    before = snapshot(trained)
    line = one_line(run(["pretrain.py", *TINY_RUN, "train.epochs=3", "optim.base_lr=1e30",
                         f"output_dir={trained}"]), "pretrain.py")
    assert "was trained with other settings" in line and "optim.base_lr" in line and "allow_changes" in line
    assert snapshot(trained) == before  # config.yaml still describes the checkpoints beside it
    # Settings that change neither model nor trajectory are free, and the history records each start.
    history = (trained / "config_history.jsonl").read_text().splitlines()
    assert len(history) == 1 and json.loads(history[0])["resumed_from"] is None


@pytest.mark.slow
def test_allowed_change_keeps_the_history(tmp_path):
    out = tmp_path / "run"
    assert run(["pretrain.py", *TINY_RUN, "checkpoint.every_n_epochs=1", f"output_dir={out}"]).returncode == 0
    result = run(["pretrain.py", *TINY_RUN, "train.epochs=2", "checkpoint.allow_changes=true", f"output_dir={out}"])
    assert result.returncode == 0, result.stderr[-2000:]
    history = [json.loads(line) for line in (out / "config_history.jsonl").read_text().splitlines()]
    assert [h["config"]["train"]["epochs"] for h in history] == [1, 2]
    assert history[1]["resumed_from"].endswith("epoch_0001")
    assert "epochs: 2" in (out / "config.yaml").read_text()
    mode = stat.S_IMODE((out / "backbone.safetensors").stat().st_mode)
    assert mode == stat.S_IMODE((out / "config.yaml").stat().st_mode) == 0o644


@pytest.mark.slow
def test_corrupt_newest_checkpoint_names_the_way_out(tmp_path):
    out = tmp_path / "run"
    args = ["pretrain.py", *TINY_RUN, "train.epochs=2", "checkpoint.every_n_epochs=1", f"output_dir={out}"]
    assert run(args).returncode == 0
    older, newest = complete_checkpoints(out)
    (newest / "model.safetensors").write_bytes(b"garbage")
    line = one_line(run(args), "pretrain.py")  # the same command, as a user reruns it
    assert f"checkpoint {newest} is damaged" in line and f"checkpoint.resume={older}" in line
    assert older.is_dir() and (older / "model.safetensors").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.parametrize("args, words", [
    (["-m", "linear_probe", "--epochs", "0"], "linear_probe: error: --epochs must be >= 1, got 0"),
    (["-m", "linear_probe", "--epochs", "-3"], "linear_probe: error: --epochs must be >= 1, got -3"),
    (["-m", "linear_probe", "--val-fraction", "1.5"], "linear_probe: error: --val-fraction must be in (0, 1)"),
    (["-m", "knn_eval", "--k", "0"], "knn_eval: error: k must be >= 1"),
    (["-m", "knn_eval", "--temperature", "0"], "knn_eval: error: temperature must be a positive number"),
])
def test_evaluator_arguments_are_checked_before_any_work(trained, args, words):
    before = snapshot(trained)
    result = run([*args, "--run", str(trained)])
    assert one_line(result, args[1]) == words or one_line(result, args[1]).startswith(words)
    assert "features" not in result.stderr and "kNN bank" not in result.stderr  # nothing was extracted
    assert snapshot(trained) == before  # knn.json / linear_probe.json untouched


@pytest.mark.slow
def test_results_of_other_settings_are_kept(trained):
    knn = json.loads((trained / "knn.json").read_text())
    assert run(["-m", "knn_eval", "--run", str(trained), "--k", "5", "--temperature", "0.1"]).returncode == 0
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
    result = run(["pretrain.py", "data.name=imagefolder", f"data.root={root}", "data.image_size=32",
                  "data.num_workers=1", "train.batch_size=4", "train.epochs=1", "model.width=0.25",
                  "monitor.enabled=false", f"output_dir={tmp_path / 'run'}"])
    assert expected in one_line(result, "pretrain.py")
