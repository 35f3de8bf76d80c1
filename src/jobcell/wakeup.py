"""Waking the worker: a named pipe in the cell's ``locks/`` that submitters poke.

The worker polls the store every ``poll_interval_s`` anyway; the pipe only makes it
notice new work at once. Everything here is best effort: no pipe, no listener or a
full pipe all mean "the next poll will see it".
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path


def open_listener(path: Path) -> int | None:
    """Create the pipe if needed and open it for the worker (non-blocking).

    Opened read-write, so that the worker's own write end keeps the pipe from reporting
    end-of-file when no submitter has it open. None when no pipe can be made here.
    """
    try:
        if not path.exists():
            with contextlib.suppress(FileExistsError):
                os.mkfifo(path, 0o600)
        if not stat.S_ISFIFO(path.lstat().st_mode):
            return None
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None


def drain(fd: int) -> None:
    """Read whatever pokes are pending."""
    with contextlib.suppress(BlockingIOError, OSError):
        while os.read(fd, 4096):
            pass


def notify(path: Path) -> None:
    """Poke the worker, if one is listening; never blocks, never fails."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return  # ENXIO: no worker listening; ENOENT: no pipe yet
    try:
        with contextlib.suppress(OSError):
            os.write(fd, b"!")
    finally:
        os.close(fd)
