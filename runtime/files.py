"""Writing the runtime's files: whole or not at all (no torch here: the agent and ``python -m runtime`` use it)."""

from __future__ import annotations

import os
from pathlib import Path


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` (created with ``mode`` whatever the umask, or truncated)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def write_atomic(path, data: bytes | str, mode: int = 0o644) -> None:
    """Write a file whole or not at all: to ``PATH.tmp``, then renamed (every file the runtime writes goes so)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write_file(tmp, data.encode() if isinstance(data, str) else data, mode)
    os.replace(tmp, path)
