"""The wake-up pipe: pokes reach a listening worker; without one nothing fails."""

from __future__ import annotations

import os
import select
from pathlib import Path

from jobcell import wakeup


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_poke_reaches_the_listener_and_drain_clears_it(tmp_path: Path) -> None:
    pipe = tmp_path / "wake.fifo"
    fd = wakeup.open_listener(pipe)
    assert fd is not None
    try:
        assert not readable(fd)
        wakeup.notify(pipe)
        wakeup.notify(pipe)
        assert readable(fd)
        wakeup.drain(fd)
        assert not readable(fd)
    finally:
        os.close(fd)


def test_notify_without_pipe_or_listener_does_nothing(tmp_path: Path) -> None:
    wakeup.notify(tmp_path / "missing.fifo")          # no pipe at all
    pipe = tmp_path / "wake.fifo"
    os.mkfifo(pipe)
    wakeup.notify(pipe)                               # a pipe nobody listens on: ENXIO


def test_a_full_pipe_does_not_block_the_submitter(tmp_path: Path) -> None:
    pipe = tmp_path / "wake.fifo"
    fd = wakeup.open_listener(pipe)
    assert fd is not None
    try:
        for _ in range(70_000):                       # more than the 64 KiB pipe buffer
            wakeup.notify(pipe)
        assert readable(fd)
    finally:
        os.close(fd)


def test_a_regular_file_in_the_way_gives_no_listener(tmp_path: Path) -> None:
    pipe = tmp_path / "wake.fifo"
    pipe.write_text("not a pipe")
    assert wakeup.open_listener(pipe) is None
