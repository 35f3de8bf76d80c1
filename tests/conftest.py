"""Shared fixtures: a fresh cell home per test, isolated from the user's environment."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobcell.service import Cell
from jobcell.worker import Worker


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("JOBCELL_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("JOBCELL_HOME", str(tmp_path / "default-home"))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A path for a cell home (created on first use by the code under test)."""
    return tmp_path / "cell"


@pytest.fixture
def cell(home: Path) -> Iterator[Cell]:
    """A cell whose worker the test drives itself (no daemon is started)."""
    with Cell(home, auto_worker=False, settings={"retry_backoff_s": 0.05,
                                                 "kill_grace_s": 1}) as opened:
        yield opened
    stop_daemon(opened)


def stop_daemon(cell: Cell) -> None:
    """Stop a daemon worker a test may have started."""
    info = cell.store.lock_info()
    if info is not None:
        cell.stop_worker(timeout_s=10)


def run_worker(cell: Cell, timeout_s: float = 60.0) -> Worker:
    """Run an in-process worker until no job is active."""
    worker = Worker(cell.home, cell.settings, cell.store)
    import threading

    timer = threading.Timer(timeout_s, worker.request_stop)
    timer.start()
    try:
        worker.run(until_idle=True)
    finally:
        timer.cancel()
    return worker


@pytest.fixture
def scripts(tmp_path: Path) -> Path:
    """A folder of small runner scripts (real programs the runners execute)."""
    folder = tmp_path / "scripts"
    folder.mkdir()
    (folder / "write.py").write_text(textwrap.dedent("""
        import pathlib, sys
        out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
        (out / sys.argv[2]).write_text(sys.argv[3])
    """))
    return folder


@pytest.fixture
def python_exe() -> str:
    return sys.executable
