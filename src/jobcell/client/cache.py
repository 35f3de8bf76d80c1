"""The client-side execution cache: what makes re-running a script re-attach.

Key: task name + version + hash of the canonical JSON input (provisioning is not
part of it). Entry: the execution id, its last known state, and the backend that
holds it. The cache is an index, not the truth: the task client checks every entry
against its backend and treats an execution the backend no longer knows as a miss.
"""

from __future__ import annotations

import contextlib
import dbm
import json
import shelve
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from jobcell.client.config import CacheMode
from jobcell.model.canonical import hash_value

PENDING, SUCCEEDED, FAILED = "pending", "succeeded", "failed"
EntryState = Literal["pending", "succeeded", "failed"]
Decision = Literal["use", "reattach", "ignore", "miss", "off"]


def cache_key(task_name: str, version: str, task_input: Any) -> str:
    """``<task>@<version>:<sha256 of the canonical JSON input>``."""
    return f"{task_name}@{version}:{hash_value(task_input)}"


def entry_state(backend_state: str) -> EntryState:
    """A backend job state (queued, running, succeeded, failed, cancelled) as an entry
    state: pending while it runs, succeeded, or failed (failed and cancelled)."""
    if backend_state in ("queued", "running", "pending"):
        return PENDING
    return SUCCEEDED if backend_state == "succeeded" else FAILED


@dataclass(frozen=True)
class CacheEntry:
    """One cached execution: its id, last known state and the backend that runs it."""

    execution_id: str
    state: EntryState
    backend: str
    task_name: str
    task_version: str
    updated_at: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> CacheEntry | None:
        """The entry, or None for unreadable data (an entry from another version)."""
        try:
            data = json.loads(text)
            return cls(**data) if isinstance(data, dict) else None
        except (TypeError, ValueError):
            return None


def new_entry(execution_id: str, backend_state: str, backend: str, task_name: str,
              task_version: str) -> CacheEntry:
    """An entry stamped now."""
    return CacheEntry(execution_id, entry_state(backend_state), backend, task_name,
                      task_version, time.time())


def decide(mode: CacheMode, entry: CacheEntry | None) -> Decision:
    """What the cache mode does with ``entry``: ``use`` its finished execution,
    ``reattach`` to its pending one, ``ignore`` it (submit anew), ``miss`` (no entry),
    or ``off`` (DISABLED: the cache is neither read nor written)."""
    if mode is CacheMode.DISABLED:
        return "off"
    if entry is None:
        return "miss"
    if mode is CacheMode.WRITE_ONLY:
        return "ignore"
    if entry.state == PENDING:
        return "reattach"
    if mode is CacheMode.FULLY_CACHED:
        return "use"
    if mode is CacheMode.RESTART_FAILED and entry.state == SUCCEEDED:
        return "use"
    return "ignore"


class CacheStorage(Protocol):
    """Where entries are kept."""

    def get(self, key: str) -> CacheEntry | None: ...

    def put(self, key: str, entry: CacheEntry) -> None: ...

    def delete(self, key: str) -> None: ...

    def close(self) -> None: ...


class SQLiteStorage:
    """Entries in a SQLite file (WAL, shared by the script's threads and processes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
        with self._lock:
            with contextlib.suppress(sqlite3.OperationalError):
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS executions ("
                             "key TEXT PRIMARY KEY, entry TEXT NOT NULL)")

    def get(self, key: str) -> CacheEntry | None:
        with self._lock:
            row = self._db.execute("SELECT entry FROM executions WHERE key = ?",
                                   (key,)).fetchone()
        return None if row is None else CacheEntry.from_json(row[0])

    def put(self, key: str, entry: CacheEntry) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO executions (key, entry) VALUES (?, ?)",
                             (key, entry.to_json()))

    def delete(self, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM executions WHERE key = ?", (key,))

    def keys(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT key FROM executions ORDER BY key")]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __repr__(self) -> str:
        return f"SQLiteStorage({str(self.path)!r})"


class ShelveStorage:
    """Entries in a :mod:`shelve` file, opened per operation (so other processes see
    each write at once)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _open(self, flag: Literal["r", "c"]) -> shelve.Shelf[Any]:
        return shelve.open(str(self.path), flag=flag)

    def get(self, key: str) -> CacheEntry | None:
        with self._lock:
            try:
                with self._open("r") as shelf:
                    text = shelf.get(key)
            except dbm.error:   # no file yet
                return None
        return None if text is None else CacheEntry.from_json(text)

    def put(self, key: str, entry: CacheEntry) -> None:
        with self._lock, self._open("c") as shelf:
            shelf[key] = entry.to_json()

    def delete(self, key: str) -> None:
        with self._lock, self._open("c") as shelf:
            shelf.pop(key, None)

    def keys(self) -> list[str]:
        with self._lock:
            try:
                with self._open("r") as shelf:
                    return sorted(shelf.keys())
            except dbm.error:
                return []

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"ShelveStorage({str(self.path)!r})"


class ChainedStorage:
    """Several storages in order: reads try each; a hit in a later one is written back
    to the first; writes go to the first."""

    def __init__(self, storages: list[CacheStorage]) -> None:
        self.storages = storages

    def get(self, key: str) -> CacheEntry | None:
        for position, storage in enumerate(self.storages):
            entry = storage.get(key)
            if entry is not None:
                if position:
                    self.storages[0].put(key, entry)
                return entry
        return None

    def put(self, key: str, entry: CacheEntry) -> None:
        self.storages[0].put(key, entry)

    def delete(self, key: str) -> None:
        for storage in self.storages:
            storage.delete(key)

    def close(self) -> None:
        pass   # the storages are shared; closed by close_all()


_open: dict[tuple[str, Path], CacheStorage] = {}
_open_lock = threading.Lock()


def _shared(kind: str, path: Path, factory: Any) -> CacheStorage:
    with _open_lock:
        storage = _open.get((kind, path))
        if storage is None:
            storage = _open[(kind, path)] = factory(path)
        return storage


def open_sqlite(path: Path) -> CacheStorage:
    """The process's one open SQLite storage for ``path``."""
    return _shared("sqlite", path, SQLiteStorage)


def open_shelve(path: Path) -> CacheStorage:
    """The process's one shelve storage for ``path``."""
    return _shared("shelve", path, ShelveStorage)


def close_all() -> None:
    """Close every storage this process opened (tests; the end of a script)."""
    with _open_lock:
        storages = list(_open.values())
        _open.clear()
    for storage in storages:
        storage.close()
