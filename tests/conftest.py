"""pytest's shared fixtures and hooks only. What tests share as code lives in the `helpers` package
(tests/helpers/__init__.py): `from helpers import REPO, TINY, run_pretrain, ...`."""

