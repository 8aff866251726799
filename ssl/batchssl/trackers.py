"""Experiment trackers (`train.log_with=tensorboard | wandb`): the config they record.

TensorBoard's `add_hparams` (what Accelerate's `init_trackers(config=...)` calls) accepts only int, float, str,
bool and tensors: a list (optim.betas) raises ValueError, and a None (data.limit, train.max_grad_norm, ...) is
silently dropped from the hparams table. So the resolved config is flattened to `section.key` scalars first, None
as "none" (W&B takes the same dict).
"""

from __future__ import annotations


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
