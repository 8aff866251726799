"""Experiment trackers (`train.log_with=tensorboard | wandb`): the config they record, and reading TensorBoard's
event files back.

TensorBoard's `add_hparams` (what Accelerate's `init_trackers(config=...)` calls) accepts only int, float, str,
bool and tensors: a list (optim.betas) raises ValueError, and a None (data.limit, train.max_grad_norm, ...) is
silently dropped from the hparams table. So the resolved config is flattened to `section.key` scalars first, None
as "none" (W&B takes the same dict).
"""

from __future__ import annotations

from pathlib import Path


def tracker_config(cfg_dict: dict, prefix: str = "") -> dict:
    """The resolved config (batchssl.config.to_dict(cfg)) as flat {"section.key": scalar}: nested sections are
    joined with dots, None becomes "none", lists and tuples (and anything else that is not a bool, int, float or
    str) become their str()."""
    flat: dict = {}
    for key, value in cfg_dict.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(tracker_config(value, prefix=f"{name}."))
        elif value is None:
            flat[name] = "none"
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(list(value)) if isinstance(value, tuple) else str(value)
    return flat


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
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
