"""A Ctrl-C that Python swallows still ends ``jobcell wait``."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import pytest

from jobcell import cli


class _RunningCell:
    """A cell whose job never ends; it reports each round to ``on_progress``."""

    def __init__(self) -> None:
        self.rounds = 0

    def wait(self, job_id: str, *, timeout_s: float | None,
             on_progress: Any) -> dict[str, Any]:
        while True:
            self.rounds += 1
            on_progress({"job_id": job_id, "state": "running", "steps": []})
            if self.rounds > 1000:
                raise AssertionError("the wait never noticed the interrupt")


@pytest.fixture
def fresh_flag() -> Iterator[None]:
    cli._CtrlC.seen = False
    yield
    cli._CtrlC.seen = False


def test_a_swallowed_interrupt_ends_the_wait_on_its_next_round(fresh_flag: None) -> None:
    cell = _RunningCell()
    # The handler runs, but its KeyboardInterrupt is lost (as in a weakref callback).
    with pytest.raises(KeyboardInterrupt):
        cli._CtrlC.handler(signal.SIGINT, None)
    assert cli._CtrlC.seen
    with pytest.raises(KeyboardInterrupt):
        cli._wait_and_report(cell, "j1", None, as_json=True)
    assert cell.rounds == 1


def test_without_an_interrupt_the_wait_goes_on(fresh_flag: None) -> None:
    cell = _RunningCell()
    with pytest.raises(AssertionError, match="never noticed"):
        cli._wait_and_report(cell, "j1", None, as_json=True)
