"""SQLite store: WAL, a busy timeout, one transaction helper, every query named here."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jobcell.errors import ConfigError
from jobcell.model.states import JobState, StepState
from jobcell.store.base import (
    AttemptRow,
    Changes,
    ConflictError,
    CooldownRow,
    EventRow,
    FileHash,
    JobRow,
    JobSummaryRow,
    LockInfo,
    LockLostError,
    NewEvent,
    OutputRow,
    StepRow,
)
from jobcell.store.schema import MIGRATIONS
from jobcell.store.sqlite_server import ServerTables

_STEP_FIELDS = frozenset({"state", "attempt", "failures", "exit_code", "not_before", "started_at",
                          "finished_at", "pid", "error", "memory_mb", "gpus", "step_key",
                          "backend", "backend_id"})
_JOB_FIELDS = frozenset({"state", "updated_at", "finished_at", "error", "cancel_requested"})
_JOB_COLUMNS = ("job_id, label, owner, tags, priority, state, spec, spec_hash, created_at, "
                "updated_at, finished_at, cancel_requested, error")
_SUMMARY_COLUMNS = ("job_id, label, owner, tags, priority, state, created_at, finished_at, "
                    "error")
_STEP_COLUMNS = ("job_id, step_id, idx, runner, runner_hash, runner_def, params, inputs, "
                 "input_layout, cache, cpu_slots, memory_mb, timeout_s, retries, state, attempt, "
                 "failures, exit_code, not_before, started_at, finished_at, pid, error, priority, "
                 "owner, seq, gpus, step_key, cache_ns, backend, backend_id, files, profile")
_LOCK_NAME = "scheduler"


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


# A timestamp as two exact JSON integers (see SQLiteStore._summaries_as_json): the whole
# seconds, and the fraction times 2**62, exact for 2**-10 <= |t| < 2**53 and for 0.
_FRACTION_SCALE = 2**62


def _exact_pair(column: str) -> str:
    # Integer literals only: SQLite turns them into doubles exactly (powers of two), and
    # the subtraction and the multiplication are exact in the range _pair_is_exact checks.
    return (f"CAST({column} AS INTEGER), "
            f"CAST(({column} - CAST({column} AS INTEGER)) * {_FRACTION_SCALE} AS INTEGER)")


def _pair_is_exact(column: str) -> str:
    return (f"({column} IS NULL OR {column} = 0 OR "
            f"(abs({column}) * 1024 >= 1 AND abs({column}) < {2**53}))")


def _newest_first(row: JobSummaryRow) -> tuple[float, str]:
    return row.created_at, row.job_id


class SQLiteStore(ServerTables):
    """The embedded default store: one SQLite file in WAL mode."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0) -> None:
        self.path = str(path)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._runner_defs: dict[str, dict[str, Any]] = {}   # treat as read-only
        self._runner_texts: dict[str, str] = {}
        self._json_pages = True     # list pages as one JSON text (see list_job_summaries)
        self._migrate()

    # -- connections and transactions
    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s,
                                   isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE: writers queue up, readers go on)."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _migrate(self) -> None:
        # Opening an up-to-date database only reads: no write lock, no fsync.
        if self._stored_version() == len(MIGRATIONS):
            return
        with self._tx() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            version = self._stored_version()
            if version > len(MIGRATIONS):
                raise ConfigError(f"{self.path}: schema version {version} is newer than this "
                                  f"jobcell knows ({len(MIGRATIONS)}); upgrade jobcell")
            for script in MIGRATIONS[version:]:
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                         (str(len(MIGRATIONS)),))

    def _stored_version(self) -> int:
        try:
            row = self._conn().execute(
                "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.OperationalError:
            return 0  # no meta table yet: a new database
        return int(row[0]) if row else 0

    def schema_version(self) -> int:
        """The schema version of the database file."""
        row = self._conn().execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0])

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- row conversion
    @staticmethod
    def _job(row: sqlite3.Row) -> JobRow:
        return JobRow(
            job_id=row["job_id"], label=row["label"], owner=row["owner"],
            tags=json.loads(row["tags"]), priority=row["priority"], state=JobState(row["state"]),
            spec=json.loads(row["spec"]), spec_hash=row["spec_hash"],
            created_at=row["created_at"], updated_at=row["updated_at"],
            finished_at=row["finished_at"], cancel_requested=bool(row["cancel_requested"]),
            error=row["error"])

    def _runner_def(self, runner_hash: str, text: str) -> dict[str, Any]:
        # Every step of a runner version carries the same definition: parse it once.
        parsed = self._runner_defs.get(runner_hash)
        if parsed is None or self._runner_texts.get(runner_hash) != text:
            parsed = json.loads(text)
            if len(self._runner_defs) > 1024:
                self._runner_defs.clear()
                self._runner_texts.clear()
            self._runner_defs[runner_hash] = parsed
            self._runner_texts[runner_hash] = text
        return parsed

    def _step(self, row: sqlite3.Row) -> StepRow:
        return StepRow(
            job_id=row["job_id"], step_id=row["step_id"], index=row["idx"], runner=row["runner"],
            runner_hash=row["runner_hash"],
            runner_def=self._runner_def(row["runner_hash"], row["runner_def"]),
            params=json.loads(row["params"]), inputs=json.loads(row["inputs"]),
            input_layout=row["input_layout"], cache=bool(row["cache"]),
            cpu_slots=row["cpu_slots"], memory_mb=row["memory_mb"], timeout_s=row["timeout_s"],
            retries=row["retries"], state=StepState(row["state"]), attempt=row["attempt"],
            failures=row["failures"],
            exit_code=row["exit_code"], not_before=row["not_before"],
            started_at=row["started_at"], finished_at=row["finished_at"], pid=row["pid"],
            error=row["error"], priority=row["priority"], owner=row["owner"], seq=row["seq"],
            gpus=json.loads(row["gpus"]) if row["gpus"] else None, step_key=row["step_key"],
            cache_ns=row["cache_ns"], backend=row["backend"], backend_id=row["backend_id"],
            files=json.loads(row["files"]) if row["files"] else {}, profile=row["profile"])

    # -- jobs
    def insert_jobs(self, jobs: Sequence[JobRow], events: Sequence[NewEvent]) -> None:
        job_rows = [(j.job_id, j.label, j.owner, _dumps(j.tags), j.priority, str(j.state),
                     _dumps(j.spec), j.spec_hash, j.created_at, j.updated_at, j.finished_at,
                     int(j.cancel_requested), j.error) for j in jobs]
        tag_rows = [(tag, j.job_id) for j in jobs for tag in j.tags]
        step_rows = [(s.job_id, s.step_id, s.index, s.runner, s.runner_hash,
                      _dumps(s.runner_def), _dumps(s.params), _dumps(s.inputs), s.input_layout,
                      int(s.cache), s.cpu_slots, s.memory_mb, s.timeout_s, s.retries,
                      str(s.state), s.attempt, s.priority, s.owner, s.cache_ns,
                      _dumps(s.files) if s.files else None, s.profile)
                     for j in jobs for s in j.steps]
        with self._tx() as conn:
            conn.executemany(f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES "
                             "(?,?,?,?,?,?,?,?,?,?,?,?,?)", job_rows)
            conn.executemany("INSERT INTO job_tags (tag, job_id) VALUES (?,?)", tag_rows)
            conn.executemany(
                "INSERT INTO steps (job_id, step_id, idx, runner, runner_hash, runner_def, "
                "params, inputs, input_layout, cache, cpu_slots, memory_mb, timeout_s, retries, "
                "state, attempt, priority, owner, cache_ns, files, profile) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                step_rows)
            self._insert_events(conn, events)

    def find_job_by_spec_hash(self, spec_hash: str, owner: str,
                              states: Iterable[JobState]) -> str | None:
        wanted = [str(s) for s in states]
        marks = ",".join("?" * len(wanted))
        row = self._conn().execute(
            f"SELECT job_id FROM jobs WHERE spec_hash = ? AND owner = ? AND state IN ({marks}) "
            "ORDER BY created_at DESC LIMIT 1", (spec_hash, owner, *wanted)).fetchone()
        return row[0] if row else None

    def get_job(self, job_id: str, with_steps: bool = True) -> JobRow | None:
        conn = self._conn()
        row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?",
                           (job_id,)).fetchone()
        if row is None:
            return None
        job = self._job(row)
        if with_steps:
            job.steps = [self._step(r) for r in conn.execute(
                f"SELECT {_STEP_COLUMNS} FROM steps WHERE job_id = ? ORDER BY idx", (job_id,))]
        return job

    def _job_filter(self, label: str | None, state: JobState | None, tag: str | None,
                    owner: str | None) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        for column, value in (("label", label), ("state", state), ("owner", owner)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(str(value))
        if tag is not None:
            clauses.append("job_id IN (SELECT job_id FROM job_tags WHERE tag = ?)")
            args.append(tag)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        return where, args

    def list_jobs(self, *, label: str | None = None, state: JobState | None = None,
                  tag: str | None = None, owner: str | None = None, limit: int = 100,
                  offset: int = 0) -> list[JobRow]:
        where, args = self._job_filter(label, state, tag, owner)
        rows = self._conn().execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs {where} ORDER BY created_at DESC, job_id DESC "
            "LIMIT ? OFFSET ?", (*args, limit, offset))
        return [self._job(r) for r in rows]

    def list_job_summaries(self, *, label: str | None = None, state: JobState | None = None,
                           tag: str | None = None, owner: str | None = None, limit: int = 100,
                           offset: int = 0) -> list[JobSummaryRow]:
        where, args = self._job_filter(label, state, tag, owner)
        query = (f"SELECT {_SUMMARY_COLUMNS} FROM jobs {where} "
                 "ORDER BY created_at DESC, job_id DESC LIMIT ? OFFSET ?")
        args = [*args, limit, offset]
        if self._json_pages:
            try:
                rows = self._summaries_as_json(query, args)
            except sqlite3.OperationalError as exc:
                if "no such function" not in str(exc):
                    raise
                self._json_pages = False     # an SQLite without its JSON functions
                rows = None
            if rows is not None:
                return rows
        cursor = self._conn().cursor()
        cursor.row_factory = None
        loads = json.loads
        return [JobSummaryRow(r[0], r[1], r[2], loads(r[3]), r[4], r[5], r[6], r[7], r[8])
                for r in cursor.execute(query, args).fetchall()]

    def _summaries_as_json(self, query: str, args: list[Any]) -> list[JobSummaryRow] | None:
        """The page as one JSON text that SQLite builds: one step of the statement for the
        whole page. Stepping row by row releases and re-takes the GIL on every row, which
        under concurrent requests costs more than the query.

        JSON numbers from SQLite carry only 15 digits, so each timestamp travels as two
        exact integers: its whole seconds and its fraction times 2**62. None when a
        timestamp of the page cannot travel so (beyond 2**53 s or within 1/1024 s of 0,
        never a real one); the caller reads the rows then.
        """
        text, inexact = self._conn().execute(
            f"SELECT json_group_array(json_array(job_id, label, owner, json(tags), priority, "
            f"state, {_exact_pair('created_at')}, {_exact_pair('finished_at')}, error)), "
            f"sum(NOT ({_pair_is_exact('created_at')} AND {_pair_is_exact('finished_at')})) "
            f"FROM ({query})", args).fetchone()
        if inexact:
            return None
        scale = _FRACTION_SCALE
        rows = [JobSummaryRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6] + r[7] / scale,
                              None if r[8] is None else r[8] + r[9] / scale, r[10])
                for r in json.loads(text)]
        # An aggregate's input order is SQLite's choice: keep the query's order for sure
        # (a sorted list sorts in one pass).
        rows.sort(key=_newest_first, reverse=True)
        return rows

    def count_jobs(self, *, states: Iterable[JobState] | None = None, owner: str | None = None,
                   tag_pattern: str | None = None) -> int:
        clauses: list[str] = []
        args: list[Any] = []
        if states is not None:
            wanted = [str(s) for s in states]
            clauses.append(f"state IN ({','.join('?' * len(wanted))})")
            args.extend(wanted)
        if owner is not None:
            clauses.append("owner = ?")
            args.append(owner)
        if tag_pattern is not None:
            clauses.append("job_id IN (SELECT job_id FROM job_tags WHERE tag GLOB ?)")
            args.append(tag_pattern)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        return int(self._conn().execute(f"SELECT count(*) FROM jobs {where}", args).fetchone()[0])

    def job_ids_by_tag(self, tag_pattern: str,
                       states: Iterable[JobState] | None = None) -> list[str]:
        args: list[Any] = [tag_pattern]
        state_clause = ""
        if states is not None:
            wanted = [str(s) for s in states]
            state_clause = f"AND j.state IN ({','.join('?' * len(wanted))})"
            args.extend(wanted)
        rows = self._conn().execute(
            "SELECT DISTINCT j.job_id, j.created_at FROM jobs j JOIN job_tags t "
            f"ON t.job_id = j.job_id WHERE t.tag GLOB ? {state_clause} ORDER BY j.created_at",
            args)
        return [r[0] for r in rows]

    def events(self, job_id: str, after_seq: int = 0) -> list[EventRow]:
        rows = self._conn().execute(
            "SELECT seq, job_id, step_id, kind, at, data FROM events "
            "WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, after_seq))
        return [EventRow(r["seq"], r["job_id"], r["step_id"], r["kind"], r["at"],
                         json.loads(r["data"]) if r["data"] else {}) for r in rows]

    def outputs(self, job_id: str) -> list[OutputRow]:
        rows = self._conn().execute(
            "SELECT o.job_id, o.step_id, o.name, o.path, o.size, o.blake3 FROM outputs o "
            "JOIN steps s ON s.job_id = o.job_id AND s.step_id = o.step_id "
            "WHERE o.job_id = ? ORDER BY s.idx, o.name", (job_id,))
        return [OutputRow(*tuple(r)) for r in rows]

    def attempts(self, job_id: str) -> list[AttemptRow]:
        rows = self._conn().execute(
            "SELECT job_id, step_id, attempt, state, started_at, finished_at, exit_code, reason, "
            "pid, memory_mb, backend, backend_id FROM attempts WHERE job_id = ? "
            "ORDER BY started_at, attempt",
            (job_id,))
        return [AttemptRow(*tuple(r)) for r in rows]

    def request_cancel(self, job_id: str, now: float) -> bool:
        with self._tx() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET cancel_requested = 1, updated_at = ? "
                "WHERE job_id = ? AND state IN ('queued', 'running') AND cancel_requested = 0",
                (now, job_id))
            if cursor.rowcount:
                self._insert_events(conn, [NewEvent(job_id, "cancel_requested", now)])
            return cursor.rowcount > 0

    # -- worker
    def steps_in_states(self, states: Iterable[StepState]) -> list[StepRow]:
        wanted = [str(s) for s in states]
        rows = self._conn().execute(
            f"SELECT {_STEP_COLUMNS} FROM steps WHERE state IN ({','.join('?' * len(wanted))}) "
            "ORDER BY priority DESC, seq", wanted)
        return [self._step(r) for r in rows]

    def job_ids_in_states(self, states: Iterable[JobState]) -> list[str]:
        wanted = [str(s) for s in states]
        rows = self._conn().execute(
            f"SELECT job_id FROM jobs WHERE state IN ({','.join('?' * len(wanted))}) "
            "ORDER BY created_at", wanted)
        return [r[0] for r in rows]

    def ready_steps(self, now: float, limit: int, exclude_runners: Collection[str] = (),
                    owner: str | None = None) -> list[StepRow]:
        excluded = sorted(exclude_runners)
        owner_clause = "" if owner is None else "AND owner = ? "
        rows = self._conn().execute(
            f"SELECT {_STEP_COLUMNS} FROM steps WHERE state = 'queued' {owner_clause}"
            "AND (not_before IS NULL OR not_before <= ?) "
            f"AND runner NOT IN ({','.join('?' * len(excluded))}) "
            "ORDER BY priority DESC, seq LIMIT ?",
            (*(() if owner is None else (owner,)), now, *excluded, limit))
        return [self._step(r) for r in rows]

    def queued_owners(self) -> list[str]:
        # A loose index scan: one index seek per owner, not one row visit per queued step.
        rows = self._conn().execute(
            "WITH RECURSIVE o(owner) AS ("
            " SELECT (SELECT min(owner) FROM steps WHERE state = 'queued')"
            " UNION ALL"
            " SELECT (SELECT min(owner) FROM steps WHERE state = 'queued' AND owner > o.owner)"
            " FROM o WHERE o.owner IS NOT NULL"
            ") SELECT owner FROM o WHERE owner IS NOT NULL")
        return [r[0] for r in rows]

    def find_cache_twins(self, keys: Collection[tuple[str, str]],
                         states: Iterable[StepState]) -> dict[tuple[str, str], StepRow]:
        wanted = [str(s) for s in states]
        found: dict[tuple[str, str], StepRow] = {}
        pairs = sorted(set(keys))
        for start in range(0, len(pairs), 200):
            chunk = pairs[start:start + 200]
            marks = ",".join("(?,?)" for _ in chunk)
            # "step_key IN" first: it is what makes SQLite use the steps_cache index.
            rows = self._conn().execute(
                f"SELECT {_STEP_COLUMNS} FROM steps WHERE seq IN ("
                f" SELECT max(seq) FROM steps WHERE step_key IN ({','.join('?' * len(chunk))})"
                f" AND (step_key, cache_ns) IN (VALUES {marks})"
                f" AND state IN ({','.join('?' * len(wanted))})"
                " GROUP BY step_key, cache_ns)",
                [*(key for key, _ns in chunk), *(v for pair in chunk for v in pair), *wanted])
            for row in rows:
                step = self._step(row)
                found[(step.step_key or "", step.cache_ns)] = step
        return found

    def cooldowns(self) -> list[CooldownRow]:
        rows = self._conn().execute(
            "SELECT group_name, reason, started_at, cooldown_until, throttle_until, "
            "throttle_max, job_id, step_id FROM cooldowns ORDER BY group_name")
        return [CooldownRow(*tuple(r)) for r in rows]

    def file_hash(self, path: str) -> FileHash | None:
        row = self._conn().execute(
            "SELECT path, size, mtime_ns, inode, blake3 FROM file_hashes WHERE path = ?",
            (path,)).fetchone()
        return FileHash(*tuple(row)) if row else None

    def record_file_hashes(self, rows: Sequence[FileHash]) -> None:
        if not rows:
            return
        with self._tx() as conn:
            conn.executemany("INSERT OR REPLACE INTO file_hashes VALUES (?,?,?,?,?)",
                             [(r.path, r.size, r.mtime_ns, r.inode, r.blake3) for r in rows])

    def terminal_jobs_before(self, finished_before: float, limit: int) -> list[str]:
        rows = self._conn().execute(
            "SELECT job_id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ? "
            "AND state IN ('succeeded', 'failed', 'cancelled') ORDER BY finished_at LIMIT ?",
            (finished_before, limit))
        return [r[0] for r in rows]

    def delete_jobs(self, job_ids: Sequence[str]) -> int:
        deleted = 0
        with self._tx() as conn:
            for job_id in job_ids:
                cursor = conn.execute(
                    "DELETE FROM jobs WHERE job_id = ? "
                    "AND state IN ('succeeded', 'failed', 'cancelled')", (job_id,))
                if cursor.rowcount != 1:
                    continue  # gone already, or not terminal: never delete live work
                deleted += 1
                for table in ("attempts", "events", "outputs", "deliveries"):
                    conn.execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))
        return deleted

    def forget_file_hashes(self, prefix: str) -> None:
        # A range on the primary key, so no scan: every path that starts with ``prefix``.
        if not prefix:
            return
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        with self._tx() as conn:
            conn.execute("DELETE FROM file_hashes WHERE path >= ? AND path < ?", (prefix, end))

    def jobs_with_cancel_requested(self) -> list[str]:
        rows = self._conn().execute(
            "SELECT job_id FROM jobs WHERE cancel_requested = 1 "
            "AND state IN ('queued', 'running')")
        return [r[0] for r in rows]

    def queue_depth(self) -> list[tuple[str, str, int]]:
        rows = self._conn().execute(
            "SELECT runner, owner, count(*) FROM steps WHERE state = 'queued' "
            "GROUP BY runner, owner ORDER BY runner, owner")
        return [(r[0], r[1], int(r[2])) for r in rows]

    def apply(self, changes: Changes, fence: str | None = None) -> None:
        with self._tx() as conn:
            if fence is not None:
                row = conn.execute("SELECT token FROM scheduler_lock WHERE name = ?",
                                   (_LOCK_NAME,)).fetchone()
                if row is None or row[0] != fence:
                    raise LockLostError("this worker no longer holds the scheduler lock")
            for update in changes.steps:
                self._update(conn, "steps", "job_id = ? AND step_id = ?",
                             (update.job_id, update.step_id), update.fields, _STEP_FIELDS,
                             update.expect)
            for job_update in changes.jobs:
                self._update(conn, "jobs", "job_id = ?", (job_update.job_id,),
                             job_update.fields, _JOB_FIELDS, job_update.expect)
            conn.executemany(
                "INSERT OR REPLACE INTO attempts (job_id, step_id, attempt, state, started_at, "
                "finished_at, exit_code, reason, pid, memory_mb, backend, backend_id) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                [(a.job_id, a.step_id, a.attempt, a.state, a.started_at, a.finished_at,
                  a.exit_code, a.reason, a.pid, a.memory_mb, a.backend, a.backend_id)
                 for a in changes.attempts])
            conn.executemany(
                "INSERT OR REPLACE INTO outputs (job_id, step_id, name, path, size, blake3) "
                "VALUES (?,?,?,?,?,?)",
                [(o.job_id, o.step_id, o.name, o.path, o.size, o.blake3)
                 for o in changes.outputs])
            self._insert_events(conn, changes.events)
            conn.executemany(
                "INSERT OR REPLACE INTO cooldowns (group_name, reason, job_id, step_id, "
                "started_at, cooldown_until, throttle_until, throttle_max) "
                "VALUES (?,?,?,?,?,?,?,?)",
                [(c.group, c.reason, c.job_id, c.step_id, c.started_at, c.cooldown_until,
                  c.throttle_until, c.throttle_max) for c in changes.cooldowns])

    @staticmethod
    def _update(conn: sqlite3.Connection, table: str, key_sql: str, key: tuple[Any, ...],
                fields: dict[str, Any], allowed: frozenset[str], expect: Any) -> None:
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"cannot update {table} column(s) {sorted(unknown)}")
        assignments = ", ".join(f"{name} = ?" for name in fields)
        values = [str(v) if isinstance(v, (JobState, StepState))
                  else _dumps(v) if isinstance(v, list) else v for v in fields.values()]
        sql = f"UPDATE {table} SET {assignments} WHERE {key_sql}"
        args = [*values, *key]
        if expect is not None:
            sql += " AND state = ?"
            args.append(str(expect))
        if conn.execute(sql, args).rowcount != 1:
            raise ConflictError(f"{table} {key} is not in the expected state {expect}")

    @staticmethod
    def _insert_events(conn: sqlite3.Connection, events: Sequence[NewEvent]) -> None:
        conn.executemany(
            "INSERT INTO events (job_id, step_id, kind, at, data) VALUES (?,?,?,?,?)",
            [(e.job_id, e.step_id, e.kind, e.at, _dumps(e.data) if e.data else None)
             for e in events])

    # -- scheduler lock
    def lock_info(self) -> LockInfo | None:
        row = self._conn().execute(
            "SELECT token, pid, hostname, started_at, heartbeat_at FROM scheduler_lock "
            "WHERE name = ?", (_LOCK_NAME,)).fetchone()
        return LockInfo(*tuple(row)) if row else None

    def try_acquire_lock(self, info: LockInfo, now: float, ttl: float,
                         steal_token: str | None = None) -> bool:
        with self._tx() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO scheduler_lock VALUES (?,?,?,?,?,?)",
                (_LOCK_NAME, info.token, info.pid, info.hostname, info.started_at, now))
            conn.execute(
                "UPDATE scheduler_lock SET token=?, pid=?, hostname=?, started_at=?, "
                "heartbeat_at=? WHERE name=? AND (heartbeat_at < ? OR token = ? OR token = ?)",
                (info.token, info.pid, info.hostname, info.started_at, now, _LOCK_NAME,
                 now - ttl, steal_token or "", info.token))
            row = conn.execute("SELECT token FROM scheduler_lock WHERE name = ?",
                               (_LOCK_NAME,)).fetchone()
            return bool(row and row[0] == info.token)

    def heartbeat(self, token: str, now: float) -> bool:
        with self._tx() as conn:
            cursor = conn.execute(
                "UPDATE scheduler_lock SET heartbeat_at = ? WHERE name = ? AND token = ?",
                (now, _LOCK_NAME, token))
            return cursor.rowcount == 1

    def release_lock(self, token: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM scheduler_lock WHERE name = ? AND token = ?",
                         (_LOCK_NAME, token))
