"""The Store interface and the records it reads and writes.

Every front end and the worker go through these methods; a PostgreSQL store
must fit the same interface and pass the same contract suite.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from jobcell.model.states import JobState, StepState


class ConflictError(RuntimeError):
    """An update expected a state that the row no longer has; nothing was written."""


class LockLostError(ConflictError):
    """A fenced write was refused: the writer no longer holds the scheduler lock."""


@dataclass
class StepRow:
    """One durable step."""

    job_id: str
    step_id: str
    index: int
    runner: str
    runner_hash: str
    runner_def: dict[str, Any]
    params: dict[str, Any]
    inputs: list[str]
    input_layout: str
    cache: bool
    cpu_slots: int
    memory_mb: int
    timeout_s: float
    retries: int
    state: StepState = StepState.PENDING
    attempt: int = 0
    failures: int = 0
    exit_code: int | None = None
    not_before: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    pid: int | None = None
    error: str | None = None
    priority: int = 0
    owner: str = ""
    seq: int = 0
    gpus: list[str] | None = None      # GPU device indexes leased to the running attempt
    step_key: str | None = None        # content address, once known (see jobcell.cache)
    cache_ns: str = ""                 # cache namespace: the job's label, or "*" (cell scope)
    backend: str | None = None         # executor of the current attempt (embedded, slurm, ...)
    backend_id: str | None = None      # its id there (PID, Slurm job id), once submitted
    files: dict[str, str] = field(default_factory=dict)  # staged name -> upload digest
    profile: str | None = None         # the runner's resource profile chosen at submit


@dataclass
class JobRow:
    """One durable job; ``steps`` is filled when asked for."""

    job_id: str
    label: str
    owner: str
    tags: list[str]
    priority: int
    state: JobState
    spec: dict[str, Any]
    spec_hash: str
    created_at: float
    updated_at: float
    finished_at: float | None = None
    cancel_requested: bool = False
    error: str | None = None
    steps: list[StepRow] = field(default_factory=list)


class JobSummaryRow(NamedTuple):
    """What a job list shows of a job: no spec, no steps, so that a page of them is cheap
    to read (``state`` is a :class:`JobState` value as a plain string)."""

    job_id: str
    label: str
    owner: str
    tags: list[str]
    priority: int
    state: str
    created_at: float
    finished_at: float | None
    error: str | None


@dataclass
class AttemptRow:
    """One attempt of a step (inserted or replaced as a whole)."""

    job_id: str
    step_id: str
    attempt: int
    state: str
    started_at: float
    finished_at: float | None = None
    exit_code: int | None = None
    reason: str | None = None
    pid: int | None = None
    memory_mb: int | None = None
    backend: str | None = None
    backend_id: str | None = None


@dataclass(frozen=True)
class NewEvent:
    """An event to append."""

    job_id: str
    kind: str
    at: float
    step_id: str | None = None
    data: dict[str, Any] | None = None


@dataclass(frozen=True)
class EventRow:
    """A stored event."""

    seq: int
    job_id: str
    step_id: str | None
    kind: str
    at: float
    data: dict[str, Any]


@dataclass(frozen=True)
class OutputRow:
    """A file a step produced."""

    job_id: str
    step_id: str
    name: str
    path: str
    size: int
    blake3: str


@dataclass(frozen=True)
class CooldownRow:
    """A concurrency group held back after an OOM-like exit: blocked until
    ``cooldown_until``, then limited to ``throttle_max`` running steps until ``throttle_until``."""

    group: str
    reason: str
    started_at: float
    cooldown_until: float
    throttle_until: float
    throttle_max: int
    job_id: str | None = None
    step_id: str | None = None


@dataclass(frozen=True)
class FileHash:
    """A remembered file digest, valid while the file keeps this identity."""

    path: str
    size: int
    mtime_ns: int
    inode: int
    blake3: str


@dataclass(frozen=True)
class StepUpdate:
    """Set ``fields`` on one step; when ``expect`` is given the step must be in that state."""

    job_id: str
    step_id: str
    fields: dict[str, Any]
    expect: StepState | None = None


@dataclass(frozen=True)
class JobUpdate:
    """Set ``fields`` on one job; when ``expect`` is given the job must be in that state."""

    job_id: str
    fields: dict[str, Any]
    expect: JobState | None = None


@dataclass
class Changes:
    """Writes applied together in one transaction."""

    steps: list[StepUpdate] = field(default_factory=list)
    jobs: list[JobUpdate] = field(default_factory=list)
    attempts: list[AttemptRow] = field(default_factory=list)
    events: list[NewEvent] = field(default_factory=list)
    outputs: list[OutputRow] = field(default_factory=list)
    cooldowns: list[CooldownRow] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.steps or self.jobs or self.attempts or self.events or self.outputs
                    or self.cooldowns)


@dataclass(frozen=True)
class LockInfo:
    """Who holds the scheduler lock of a cell."""

    token: str
    pid: int
    hostname: str
    started_at: float
    heartbeat_at: float


class Store(Protocol):
    """The narrow interface to a cell's durable state."""

    # -- jobs (written by submit, read by every front end)
    def insert_jobs(self, jobs: Sequence[JobRow], events: Sequence[NewEvent]) -> None: ...
    def find_job_by_spec_hash(self, spec_hash: str, owner: str,
                              states: Iterable[JobState]) -> str | None: ...
    def get_job(self, job_id: str, with_steps: bool = True) -> JobRow | None: ...
    def list_jobs(self, *, label: str | None = None, state: JobState | None = None,
                  tag: str | None = None, owner: str | None = None, limit: int = 100,
                  offset: int = 0) -> list[JobRow]: ...
    def list_job_summaries(self, *, label: str | None = None, state: JobState | None = None,
                           tag: str | None = None, owner: str | None = None, limit: int = 100,
                           offset: int = 0) -> list[JobSummaryRow]:
        """The jobs :meth:`list_jobs` answers, in the same order, as summaries only."""
        ...
    def count_jobs(self, *, states: Iterable[JobState] | None = None, owner: str | None = None,
                   tag_pattern: str | None = None) -> int: ...
    def job_ids_by_tag(self, tag_pattern: str,
                       states: Iterable[JobState] | None = None) -> list[str]: ...
    def events(self, job_id: str, after_seq: int = 0) -> list[EventRow]: ...
    def outputs(self, job_id: str) -> list[OutputRow]: ...
    def attempts(self, job_id: str) -> list[AttemptRow]: ...
    def request_cancel(self, job_id: str, now: float) -> bool: ...

    # -- the worker
    def steps_in_states(self, states: Iterable[StepState]) -> list[StepRow]: ...
    def job_ids_in_states(self, states: Iterable[JobState]) -> list[str]: ...
    def ready_steps(self, now: float, limit: int, exclude_runners: Collection[str] = (),
                    owner: str | None = None) -> list[StepRow]:
        """Queued steps whose backoff is over, best first (priority, then age); only
        ``owner``'s when given."""
        ...
    def queued_owners(self) -> list[str]:
        """Owners that have queued steps (cheap even with a long queue)."""
        ...
    def find_cache_twins(self, keys: Collection[tuple[str, str]],
                         states: Iterable[StepState]) -> dict[tuple[str, str], StepRow]:
        """For many (step key, cache namespace) pairs at once: one twin in ``states``
        per pair that has any (the most recently submitted)."""
        ...
    def cooldowns(self) -> list[CooldownRow]: ...
    def file_hash(self, path: str) -> FileHash | None: ...
    def record_file_hashes(self, rows: Sequence[FileHash]) -> None: ...
    def forget_file_hashes(self, prefix: str) -> None:
        """Drop remembered digests of every path under ``prefix`` (deleted artifacts)."""
        ...
    def terminal_jobs_before(self, finished_before: float, limit: int) -> list[str]: ...
    def delete_jobs(self, job_ids: Sequence[str]) -> int:
        """Delete terminal jobs with their steps, attempts, events, outputs and tags."""
        ...
    def jobs_with_cancel_requested(self) -> list[str]: ...
    def queue_depth(self) -> list[tuple[str, str, int]]: ...
    def apply(self, changes: Changes, fence: str | None = None) -> None:
        """Apply ``changes`` in one transaction. With ``fence`` (a lock token) the
        transaction commits only while that token holds the scheduler lock, so a
        worker that was replaced while it stalled can never write again."""
        ...

    # -- the scheduler lock
    def lock_info(self) -> LockInfo | None: ...
    def try_acquire_lock(self, info: LockInfo, now: float, ttl: float,
                         steal_token: str | None = None) -> bool: ...
    def heartbeat(self, token: str, now: float) -> bool: ...
    def release_lock(self, token: str) -> None: ...

    def schema_version(self) -> int: ...
    def close(self) -> None: ...
    # the HTTP server's tables: users, uploads, subscriber callbacks
    def add_user(self, name: str, token_hash: str, now: float) -> None: ...
    def users(self) -> list[UserRow]: ...
    def user_by_token_hash(self, token_hash: str) -> UserRow | None: ...
    def revoke_user(self, name: str, now: float) -> bool: ...
    def record_upload(self, digest: str, owner: str, size: int, now: float) -> None: ...
    def upload_size(self, digest: str, owner: str) -> int | None: ...
    def add_deliveries(self, job_id: str, uris: dict[str, str]) -> None: ...
    def open_deliveries(self, limit: int = 500) -> list[DeliveryRow]: ...
    def due_delivery_rows(self, now: float, limit: int = 500) -> list[DeliveryRow]: ...
    def waiting_delivery_rows(self, quiet_states: Iterable[str], after_seq: int = 0,
                              limit: int = 500) -> list[tuple[DeliveryRow, str | None]]: ...
    def claim_delivery(self, seq: int, attempts: int, now: float, until: float) -> bool: ...
    def deliveries(self, job_id: str) -> list[DeliveryRow]: ...
    def update_delivery(self, seq: int, *, only_if: Mapping[str, Any] | None = None,
                        **fields: Any) -> bool: ...


@dataclass(frozen=True)
class UserRow:
    """An API user: the SHA-256 of their bearer token, never the token itself."""

    name: str
    token_hash: str
    created_at: float
    revoked_at: float | None = None


@dataclass(frozen=True)
class DeliveryRow:
    """One subscriber callback (OGC ``successUri``, ``inProgressUri``, ``failedUri``).

    ``state``: ``waiting`` (its trigger has not happened), ``due`` (send at ``next_at``),
    ``done`` (delivered), ``gave_up`` (retries exhausted) or ``skipped`` (the job ended
    another way).
    """

    seq: int
    job_id: str
    kind: str
    uri: str
    state: str
    attempts: int
    next_at: float | None
    last_error: str | None
    delivered_at: float | None
