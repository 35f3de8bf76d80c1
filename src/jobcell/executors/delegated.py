"""What every delegated executor (Slurm, an admin's external wrapper) shares.

- ``external_backend.json`` in the attempt directory records the backend job id, the
  submit time and the script, written *before* the worker records anything in the
  database, so a worker that dies right after submitting is recovered from it.
- :class:`Outage`: a status command that fails makes its steps ``UNKNOWN`` (they stay
  running); the failure is logged once per outage and retried with backoff.
- :class:`MissingClock`: a job that left the backend's queue without an ``exit_code``
  gets a grace period (shared filesystems lag) before it counts as interrupted.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

RECORD_FILE = "external_backend.json"


@dataclass(frozen=True)
class BackendRecord:
    """Where a delegated attempt went."""

    backend: str
    backend_id: str
    submitted_at: float
    script: str | None = None
    job_name: str | None = None
    backend_dir: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def write_record(attempt_dir: Path, record: BackendRecord) -> None:
    """Write ``external_backend.json`` atomically and durably."""
    target = attempt_dir / RECORD_FILE
    tmp = attempt_dir / f".{RECORD_FILE}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(record.to_json())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target)


def read_record(attempt_dir: Path) -> BackendRecord | None:
    """The recorded submission, or None when there is none (or it is unreadable)."""
    try:
        data: dict[str, Any] = json.loads((attempt_dir / RECORD_FILE).read_text())
        return BackendRecord(**data)
    except (OSError, ValueError, TypeError):
        return None


def parse_exit_code(text: str | bytes | None) -> int | None:
    """The integer in an ``exit_code`` file, or None."""
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    try:
        return int(text.strip())
    except ValueError:
        return None


class Outage:
    """Tracks failing status calls: logged once per outage, retried with backoff."""

    def __init__(self, what: str, *, first_delay_s: float = 1.0, max_delay_s: float = 60.0,
                 log: TextIO | None = None) -> None:
        self.what = what
        self.first_delay_s = first_delay_s
        self.max_delay_s = max_delay_s
        self.log = log
        self.failures = 0
        self.since: float | None = None
        self.retry_at = float("-inf")
        self.last_error: str | None = None

    @property
    def active(self) -> bool:
        return self.since is not None

    def may_try(self, now: float) -> bool:
        """Whether the backoff allows another try now."""
        return now >= self.retry_at

    def failed(self, now: float, error: str) -> None:
        if self.since is None:
            self.since = now
            self._write(f"{self.what} failed ({error}); steps stay running as unknown, "
                        "retrying with backoff")
        self.failures += 1
        self.last_error = error
        delay = min(self.max_delay_s, self.first_delay_s * 2 ** (self.failures - 1))
        self.retry_at = now + delay

    def succeeded(self, now: float) -> None:
        if self.since is not None:
            self._write(f"{self.what} works again after {now - self.since:.0f} s")
        self.failures = 0
        self.since = None
        self.retry_at = float("-inf")
        self.last_error = None

    def _write(self, line: str) -> None:
        stream = self.log or sys.stderr
        print(line, file=stream, flush=True)


class MissingClock:
    """When each attempt was first seen gone from the backend without an ``exit_code``."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._since: dict[str, float] = {}

    def expired(self, key: str, now: float) -> bool:
        """Note that ``key`` is missing; True once it has been missing for the grace."""
        since = self._since.setdefault(key, now)
        return now - since >= self.grace_s

    def seen(self, key: str) -> None:
        """``key`` is accounted for again (queued, running or ended with an exit code)."""
        self._since.pop(key, None)
