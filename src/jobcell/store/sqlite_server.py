"""The SQLite tables of the HTTP server: users and tokens, uploads, subscriber callbacks."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any

from jobcell.store.base import ConflictError, DeliveryRow, UserRow

_DELIVERY_FIELDS = frozenset({"state", "attempts", "next_at", "last_error", "delivered_at"})
_DELIVERY_COLUMNS = ("seq, job_id, kind, uri, state, attempts, next_at, last_error, "
                     "delivered_at")


class ServerTables:
    """Mixed into :class:`~jobcell.store.sqlite.SQLiteStore` (which gives the connection)."""

    def _conn(self) -> sqlite3.Connection:
        raise NotImplementedError

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    # -- users
    def add_user(self, name: str, token_hash: str, now: float) -> None:
        """Add a user; :class:`ConflictError` when the name is taken (revoked or not)."""
        with self._tx() as conn:
            try:
                conn.execute("INSERT INTO users (name, token_hash, created_at) VALUES (?,?,?)",
                             (name, token_hash, now))
            except sqlite3.IntegrityError:
                raise ConflictError(f"a user named {name!r} already exists") from None

    def users(self) -> list[UserRow]:
        rows = self._conn().execute(
            "SELECT name, token_hash, created_at, revoked_at FROM users ORDER BY name")
        return [UserRow(*tuple(r)) for r in rows]

    def user_by_token_hash(self, token_hash: str) -> UserRow | None:
        row = self._conn().execute(
            "SELECT name, token_hash, created_at, revoked_at FROM users WHERE token_hash = ?",
            (token_hash,)).fetchone()
        return UserRow(*tuple(row)) if row else None

    def revoke_user(self, name: str, now: float) -> bool:
        """Revoke a user's token; False when there is no such (unrevoked) user."""
        with self._tx() as conn:
            cursor = conn.execute(
                "UPDATE users SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                (now, name))
            return cursor.rowcount > 0

    # -- uploads
    def record_upload(self, digest: str, owner: str, size: int, now: float) -> None:
        with self._tx() as conn:
            conn.execute("INSERT OR IGNORE INTO uploads (digest, owner, size, created_at) "
                         "VALUES (?,?,?,?)", (digest, owner, size, now))

    def upload_size(self, digest: str, owner: str) -> int | None:
        """The size of an upload ``owner`` made, or None when they made none of it."""
        row = self._conn().execute("SELECT size FROM uploads WHERE digest = ? AND owner = ?",
                                   (digest, owner)).fetchone()
        return int(row[0]) if row else None

    # -- subscriber callbacks
    def add_deliveries(self, job_id: str, uris: dict[str, str]) -> None:
        """Record the callbacks of a job (kind -> URI), each ``waiting`` for its trigger."""
        with self._tx() as conn:
            conn.executemany("INSERT OR IGNORE INTO deliveries (job_id, kind, uri) VALUES (?,?,?)",
                             [(job_id, kind, uri) for kind, uri in uris.items()])

    def open_deliveries(self, limit: int = 500) -> list[DeliveryRow]:
        """Callbacks still to send (``waiting`` or ``due``), oldest first (a listing: the
        sender reads :meth:`due_delivery_rows` and :meth:`waiting_delivery_rows`)."""
        rows = self._conn().execute(
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE state IN ('waiting', 'due') "
            "ORDER BY seq LIMIT ?", (limit,))
        return [DeliveryRow(*tuple(r)) for r in rows]

    def due_delivery_rows(self, now: float, limit: int = 500) -> list[DeliveryRow]:
        """``due`` callbacks whose time (``next_at``) has come, earliest first."""
        rows = self._conn().execute(
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE state = 'due' "
            "AND next_at <= ? ORDER BY next_at, seq LIMIT ?", (now, limit))
        return [DeliveryRow(*tuple(r)) for r in rows]

    def waiting_delivery_rows(self, quiet_states: Iterable[str], after_seq: int = 0,
                              limit: int = 500) -> list[tuple[DeliveryRow, str | None]]:
        """``waiting`` callbacks after ``after_seq`` (in ``seq`` order) with their job's
        state (None: the job is gone), leaving out those of jobs in ``quiet_states``
        (states in which no waiting callback can change)."""
        quiet = sorted(set(quiet_states))
        marks = ", ".join("?" * len(quiet))
        quiet_clause = f" AND (j.state IS NULL OR j.state NOT IN ({marks}))" if quiet else ""
        columns = ", ".join(f"d.{c.strip()}" for c in _DELIVERY_COLUMNS.split(","))
        rows = self._conn().execute(
            f"SELECT {columns}, j.state FROM deliveries d "
            "LEFT JOIN jobs j ON j.job_id = d.job_id "
            f"WHERE d.state = 'waiting' AND d.seq > ?{quiet_clause} ORDER BY d.seq LIMIT ?",
            (after_seq, *quiet, limit))
        return [(DeliveryRow(*tuple(r)[:-1]), r[-1]) for r in rows]

    def claim_delivery(self, seq: int, attempts: int, now: float, until: float) -> bool:
        """Take a due callback for sending: only while it is still ``due`` with
        ``attempts`` recorded attempts and its time has come; ``next_at`` becomes
        ``until`` (a lease: a sender that dies mid-send leaves it to be sent again then).
        False when another read or sender got there first."""
        with self._tx() as conn:
            cursor = conn.execute(
                "UPDATE deliveries SET next_at = ? WHERE seq = ? AND state = 'due' "
                "AND attempts = ? AND (next_at IS NULL OR next_at <= ?)",
                (until, seq, attempts, now))
            return cursor.rowcount > 0

    def deliveries(self, job_id: str) -> list[DeliveryRow]:
        rows = self._conn().execute(
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE job_id = ? ORDER BY seq",
            (job_id,))
        return [DeliveryRow(*tuple(r)) for r in rows]

    def update_delivery(self, seq: int, *, only_if: Mapping[str, Any] | None = None,
                        **fields: Any) -> bool:
        """Set ``fields`` of a callback; with ``only_if`` (field -> value) only while the
        row still has those values. False when no row changed."""
        only_if = dict(only_if or {})
        unknown = (set(fields) | set(only_if)) - _DELIVERY_FIELDS
        if unknown:
            raise ValueError(f"not delivery fields: {sorted(unknown)}")
        if not fields:
            return False
        assignments = ", ".join(f"{name} = ?" for name in fields)
        conditions = "".join(f" AND {name} IS ?" for name in only_if)
        with self._tx() as conn:
            cursor = conn.execute(
                f"UPDATE deliveries SET {assignments} WHERE seq = ?{conditions}",
                (*fields.values(), seq, *only_if.values()))
            return cursor.rowcount > 0
