"""Collapse alarm on the logged std of the l2-normalised projector outputs (`z_std`).

SimSiam (Chen & He 2021, Fig. 2) shows the per-channel std of l2-normalised outputs z / |z| staying near
1 / sqrt(d) for a healthy run (d = the output dimension: for a unit vector spread evenly over d channels each
coordinate has std about 1 / sqrt(d)), while a collapsed run -- all images mapped to one constant vector --
drops to 0 within a few hundred steps and never comes back.

Defaults, and why:
- fraction = 0.1: alarm below a tenth of the healthy level. A healthy run fluctuates around 1 / sqrt(d) and can
  dip to about half of it in the first steps (random init, warmup) or under a partial (dimensional) collapse
  where z lives in a few directions; complete collapse goes to ~1e-3 / sqrt(d) and below. A tenth is an order of
  magnitude below anything a learning run shows and orders of magnitude above what a collapsed run shows, so
  the threshold is not sensitive to its exact value.
- patience = 20 logged steps in a row: collapse is permanent, a dip is not. One noisy logged value (a batch of
  near-duplicates, a loss spike) must not raise the alarm; with the default train.log_every_n_steps = 10 this
  is 200 optimiser steps, a small fraction of any real run, so the alarm still comes early.

The alarm fires exactly once (the first time the condition holds); any value at or above the threshold resets the
count of consecutive low values. Non-finite values count as low (a NaN std is no healthy run).
"""

from __future__ import annotations

import math


class CollapseAlarm:
    def __init__(self, dim: int, fraction: float = 0.1, patience: int = 20):
        if dim < 1:
            raise ValueError(f"CollapseAlarm: dim must be >= 1, got {dim}")
        if not fraction > 0:
            raise ValueError(f"CollapseAlarm: fraction must be > 0, got {fraction}")
        if patience < 1:
            raise ValueError(f"CollapseAlarm: patience must be >= 1, got {patience}")
        self.dim, self.fraction, self.patience = dim, fraction, patience
        self.healthy = 1.0 / math.sqrt(dim)  # what SimSiam's healthy runs show
        self.threshold = fraction * self.healthy
        self.low_steps = 0  # consecutive logged values below the threshold
        self.fired = False

    def update(self, z_std: float) -> bool:
        """Feed one logged z_std; True exactly once, when it has stayed below the threshold `patience` times
        in a row."""
        z_std = float(z_std)
        if math.isfinite(z_std) and z_std >= self.threshold:
            self.low_steps = 0
            return False
        self.low_steps += 1
        if not self.fired and self.low_steps >= self.patience:
            self.fired = True
            return True
        return False

    def message(self, z_std: float | None = None) -> str:
        """One line for the log when the alarm fires."""
        now = f"z_std {z_std:.2e}, " if z_std is not None else ""
        return (
            f"collapse alarm: {now}below {self.threshold:.2e} ({self.fraction:g} / sqrt({self.dim})) for "
            f"{self.patience} logged steps in a row; a healthy run stays near 1/sqrt(d) = {self.healthy:.2e}. "
            "The representation has likely collapsed: check the lr, the predictor and the augmentations"
        )

    def state_dict(self) -> dict:
        return {"low_steps": self.low_steps, "fired": self.fired}

    def load_state_dict(self, state: dict) -> None:
        self.low_steps, self.fired = int(state["low_steps"]), bool(state["fired"])
