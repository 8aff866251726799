"""Writing files so that a stop at any moment leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def temp_path(path: str | Path) -> Path:
    """The temporary name a file is written under before it is renamed into place (same folder, same disk)."""
    path = Path(path)
    return path.with_name(f".tmp-{path.name}")


def atomic_write(path: str | Path, data: bytes | str | Callable[[Path], None]) -> Path:
    """Write `data` (bytes, text, or a function that writes a given path) to `path` atomically.

    The content goes to `temp_path(path)` first and is renamed over `path` when complete; the file is made
    readable by everyone like the run's other files (0644 under the usual umask; some writers create 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    if callable(data):
        data(tmp)
    elif isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
    return path
