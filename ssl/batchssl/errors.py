"""Errors a user can cause. The entry points print them as one line and exit non-zero, without a traceback."""

import sys
from contextlib import contextmanager


class UserError(Exception):
    """Bad input from the user: config, data, checkpoint. The message is the whole report."""


class NonFiniteLossError(UserError):
    """The loss became NaN or inf: training stops, the last good checkpoint stays the newest."""


@contextmanager
def exit_on_user_error(prog: str):
    """Turn a UserError into `prog: error: message` on stderr and exit status 2."""
    try:
        yield
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
