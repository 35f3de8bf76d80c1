"""The executor interface every backend implements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol


class Phase(StrEnum):
    """What a status query said about one launched attempt."""

    RUNNING = "running"
    EXITED = "exited"            # exit_code was written: ``exit_code`` holds it
    INTERRUPTED = "interrupted"  # no exit_code and nothing alive: requeue, never success
    UNKNOWN = "unknown"          # the status query itself failed: keep waiting


@dataclass(frozen=True)
class Launch:
    """One attempt to start: its directory, argv (never a shell string) and environment."""

    key: str
    attempt_dir: Path
    argv: tuple[str, ...]
    env: dict[str, str]


@dataclass(frozen=True)
class Status:
    """The outcome of polling one attempt."""

    phase: Phase
    exit_code: int | None = None


class Executor(Protocol):
    """Start attempts, poll them all in one round, stop them."""

    name: str

    def submit(self, launches: list[Launch]) -> dict[str, int]:
        """Start every launch; return key -> backend id (a PID for embedded)."""
        ...

    def adopt(self, key: str, attempt_dir: Path, backend_id: int | None) -> None:
        """Track an attempt started by an earlier worker."""
        ...

    def poll(self) -> dict[str, Status]:
        """The status of every tracked attempt, in one round."""
        ...

    def terminate(self, key: str, force: bool = False) -> None:
        """Ask an attempt to stop (TERM), or kill it (KILL) when ``force``."""
        ...

    def forget(self, key: str) -> None:
        """Stop tracking an attempt whose end has been recorded."""
        ...

    def wait(self, timeout: float, wake_fds: Sequence[int] = ()) -> None:
        """Block until some tracked attempt may have changed, one of ``wake_fds`` is
        readable, or ``timeout`` passes."""
        ...
