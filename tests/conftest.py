"""pytest's shared fixtures and hooks only. What tests share as code lives in the `helpers` package
(tests/helpers/__init__.py): `from helpers import REPO, TINY, run_pretrain, ...`."""

# Transitional: test_long_tail.py still imports REPO from conftest; remove this line once it imports from helpers.
from helpers import REPO  # noqa: F401
