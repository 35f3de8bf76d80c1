"""Fixtures for the acceptance tier: cell homes driven through the real ``jobcell`` command.

Every home gets the test runners in ``<home>/runners/`` and a ``jobcell.toml`` with short
delays. When a fixture is done with its home it runs ``jobcell worker stop`` there; the stop
runs while the next test starts (a stopped worker can take a while to be reaped), and the
session waits for every stop and checks that it succeeded.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import FAST_CONFIG, Cli, write_runner_files

Stops = list[tuple[Path, "subprocess.Popen[str]"]]


@pytest.fixture(scope="session")
def _worker_stops() -> Iterator[Stops]:
    stops: Stops = []
    yield stops
    failures = []
    for home, process in stops:
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        if process.returncode != 0:
            failures.append(f"`jobcell worker stop --home {home}` exited "
                            f"{process.returncode}: {output}")
    assert not failures, "\n".join(failures)


def _finish(cli: Cli, stops: Stops) -> None:
    process = cli.stop_worker()
    if process is not None:
        stops.append((cli.home, process))


def _prepare(home: Path) -> Cli:
    home.mkdir(parents=True)
    (home / "jobcell.toml").write_text(FAST_CONFIG, encoding="utf-8")
    write_runner_files(home / "runners")
    return Cli(home)


@pytest.fixture
def cli(tmp_path: Path, _worker_stops: Stops) -> Iterator[Cli]:
    """A fresh cell home of this test's own, with the test runners registered."""
    runner = _prepare(tmp_path / "cell")
    yield runner
    _finish(runner, _worker_stops)


@pytest.fixture(scope="module")
def shared_cli(tmp_path_factory: pytest.TempPathFactory, _worker_stops: Stops) -> Iterator[Cli]:
    """One cell home shared by the tests of a module (saves worker start-ups)."""
    runner = _prepare(tmp_path_factory.mktemp("shared") / "cell")
    yield runner
    _finish(runner, _worker_stops)


@pytest.fixture
def bare_cli(tmp_path: Path, _worker_stops: Stops) -> Iterator[Cli]:
    """A cell home that does not exist yet: no runners, no config file."""
    runner = Cli(tmp_path / "bare-cell")
    yield runner
    _finish(runner, _worker_stops)
