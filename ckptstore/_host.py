"""Facts about, and primitives of, the host this process runs on: whether a process lives
here, and making a directory's entries durable. Below every other module."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_directory(path: str) -> None:
    """Make the entries of directory ``path`` durable (after a create, rename or unlink)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
