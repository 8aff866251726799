"""Errors a user can cause. The entry points print them as one line and exit non-zero, without a traceback."""

import sys
from contextlib import contextmanager


class UserError(Exception):
    """Bad input from the user: config, data, checkpoint. The message is the whole report.

    quiet: raised by every process of a run together (a config mismatch, a failed checkpoint write), where the main
    process prints the line and the others only exit, so that the run says it once."""

    def __init__(self, message: str = "", quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


class NonFiniteLossError(UserError):
    """The loss became NaN or inf: training stops, the last good checkpoint stays the newest."""


@contextmanager
def exit_on_user_error(prog: str):
    """Turn a UserError into `prog: error: message` on stderr and exit status 2."""
    try:
        yield
    except UserError as err:
        if not err.quiet:
            print(f"{prog}: error: {one_line(str(err))}", file=sys.stderr, flush=True)
        sys.exit(2)


def one_line(message: str) -> str:
    """The user's message of an error, also when a DataLoader worker re-raised it with its traceback appended
    ("Caught X in DataLoader worker process 0. Original Traceback ... module.X: message")."""
    if "Original Traceback" in message:
        last = message.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return message
