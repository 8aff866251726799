"""train.log_with=tensorboard: the flattened config TensorBoard accepts, and a real run's scalars read back."""

import math
from pathlib import Path

import pytest

from batchssl.config import Config, to_dict
from batchssl.trackers import tracker_config
from helpers import TINY, pretrain_in_process, read_metrics, run_pretrain


def read_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under run_dir (Accelerate writes them to
    <output_dir>/<project name>/, add_hparams to a subfolder of that): {tag: [(step, value), ...]} sorted by
    step. Needs the `tensorboard` package."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    folders = sorted({p.parent for p in Path(run_dir).rglob("events.out.tfevents.*")})
    out: dict[str, list[tuple[int, float]]] = {}
    for folder in folders:
        events = EventAccumulator(str(folder), size_guidance={SCALARS: 0})  # 0: keep every point
        events.Reload()
        for tag in events.Tags()[SCALARS]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return {tag: sorted(points) for tag, points in out.items()}


def test_tracker_config_flattens_to_scalars():
    flat = tracker_config(
        {
            "output_dir": "runs/x",
            "seed": 0,
            "data": {"limit": None, "num_workers": 2, "download": False},
            "optim": {"betas": [0.9, 0.95], "pair": (1, 2), "base_lr": 0.05},
            "deep": {"inner": {"x": 1}},
        }
    )
    assert flat == {
        "output_dir": "runs/x",
        "seed": 0,
        "data.limit": "none",
        "data.num_workers": 2,
        "data.download": False,
        "optim.betas": "[0.9, 0.95]",
        "optim.pair": "[1, 2]",
        "optim.base_lr": 0.05,
        "deep.inner.x": 1,
    }


def test_tracker_config_of_the_default_config_is_all_scalars():
    flat = tracker_config(to_dict(Config()))
    assert flat["train.log_with"] == "none" and flat["data.limit"] == "none"
    assert flat["optim.betas"] == "[0.9, 0.95]"
    assert flat["method.proj_dim"] == 2048 and flat["output_dir"] == "runs/default"
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_tensorboard_accepts_it(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path)) as writer:
        writer.add_hparams(tracker_config(to_dict(Config())), metric_dict={})
    # What train.log_with=tensorboard died of: a list (optim.betas).
    with pytest.raises(ValueError), SummaryWriter(str(tmp_path / "raw")) as writer:
        writer.add_hparams({"optim.betas": [0.9, 0.95]}, metric_dict={})


def test_read_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "project")) as writer:
        for step in (3, 1, 2):
            writer.add_scalar("loss", 1.0 / step, global_step=step)
        writer.add_scalar("knn_top1", 42.5, global_step=3)
    scalars = read_scalars(tmp_path)
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3]
    assert scalars["knn_top1"] == [(3, 42.5)]


@pytest.mark.slow
def test_tensorboard_run_logs_every_metric(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    pretrain_in_process([*TINY, "train.log_with=tensorboard", f"output_dir={out}"])
    scalars = read_scalars(out)
    metrics = read_metrics(out)
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps == [1, 2, 3, 4]  # 256 images / 64 per step, logged every step
    for tag in ("loss", "lr"):
        assert [s for s, _ in scalars[tag]] == steps, tag
    last_step = steps[-1]
    for tag in ("knn_top1", "online_top1"):  # the monitor's line at the end of the epoch
        assert [s for s, _ in scalars[tag]] == [last_step], tag
    # Every number metrics.jsonl has is in TensorBoard at its step.
    for record in metrics:
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            logged = dict(scalars[key])
            assert math.isclose(logged[record["step"]], value, rel_tol=1e-6, abs_tol=1e-6), key


@pytest.mark.slow
def test_wandb_offline_run_writes_its_files_into_the_run_directory(tmp_path):
    """W&B through Accelerate's tracker, offline (no network here). wandb is an optional extra (about 100 MB of
    dependencies), not installed by `make setup`: this test runs where it is installed (pip install -e .[wandb])."""
    pytest.importorskip("wandb")
    run_pretrain(
        [*TINY, "train.log_with=wandb", f"output_dir={tmp_path}"], env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    )
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
