"""The SQLite tables of the HTTP server: users and tokens, uploads, subscriber callbacks."""

from __future__ import annotations

import sqlite3
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
        """Callbacks still to send (``waiting`` or ``due``), oldest first."""
        rows = self._conn().execute(
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE state IN ('waiting', 'due') "
            "ORDER BY seq LIMIT ?", (limit,))
        return [DeliveryRow(*tuple(r)) for r in rows]

    def deliveries(self, job_id: str) -> list[DeliveryRow]:
        rows = self._conn().execute(
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE job_id = ? ORDER BY seq",
            (job_id,))
        return [DeliveryRow(*tuple(r)) for r in rows]

    def update_delivery(self, seq: int, **fields: Any) -> None:
        unknown = set(fields) - _DELIVERY_FIELDS
        if unknown:
            raise ValueError(f"not delivery fields: {sorted(unknown)}")
        if not fields:
            return
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._tx() as conn:
            conn.execute(f"UPDATE deliveries SET {assignments} WHERE seq = ?",
                         (*fields.values(), seq))
