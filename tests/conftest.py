"""pytest's shared fixtures and hooks only. What tests share as code lives in the `helpers` package
(tests/helpers/__init__.py): `from helpers import REPO, TINY, run_entry, ...`."""

from dataclasses import dataclass
from pathlib import Path

import pytest

import helpers


@pytest.fixture
def own_process_state():
    """helpers.own_process_state() around one test: Accelerate's process-wide state reset before and after, torch's
    generator and thread count restored (one thread meanwhile), for tests that call train() or an evaluator."""
    with helpers.own_process_state():
        yield


@dataclass
class TinyRun:
    path: Path
    online_probe: object  # the run's batchssl.online_linear.OnlineLinear, as training left it
    probe_start: object  # its weights before its first step


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    """The default recipe on TINY (one epoch of 4 steps; kNN monitor and online linear probe on, as the recipe
    has them), trained once per session in this process, and its online probe. Tests may add the evaluators'
    results files to the run directory; nothing else of it may change."""
    from batchssl.online_linear import OnlineLinear

    run = tmp_path_factory.mktemp("tiny_run")
    probes, starts = [], []
    train_step = OnlineLinear.train_step

    def recording(probe, *args, **kwargs):
        if not any(p is probe for p in probes):
            probes.append(probe)
            starts.append(probe.linear.weight.detach().clone())
        return train_step(probe, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(OnlineLinear, "train_step", recording)
        helpers.pretrain_in_process([*helpers.TINY, f"output_dir={run}"])
    assert len(probes) == 1, f"{len(probes)} online probes trained"
    return TinyRun(run, probes[0], starts[0])
