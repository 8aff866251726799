"""pytest's shared fixtures and hooks only. What tests share as code lives in the `helpers` package
(tests/helpers/__init__.py): `from helpers import REPO, TINY, run_entry, ...`."""

import pytest

import helpers


@pytest.fixture
def own_process_state():
    """helpers.own_process_state() around one test: Accelerate's process-wide state reset before and after, torch's
    generator and thread count restored (one thread meanwhile), for tests that call train() or an evaluator."""
    with helpers.own_process_state():
        yield
