"""Subscriber callbacks of jobs (OGC ``successUri``, ``inProgressUri``, ``failedUri``).

The service-level half of callbacks: recording a job's subscriber, deciding from the
job's state which callbacks are due, and recording what each delivery attempt did.
The HTTP sender (:mod:`jobcell.server.callbacks`) builds the bodies and POSTs them;
front ends call the functions here (which take a :class:`~jobcell.service.Cell`) and
never touch the store.

A delivery moves ``waiting -> due -> done | gave_up``, or ``waiting -> skipped`` when
the job ended another way. Everything lives in the cell's database, so a restarted
server goes on where the last one stopped. Delivery is at least once: a server that
dies in the middle of a POST sends it again after the restart.

When each kind becomes due (:func:`decide`):

- ``inProgress``: once the job runs; skipped when the job ended before it was seen
  running (a queued job that was dismissed, a cached result);
- ``success``: when the job succeeded; skipped when it failed or was dismissed;
- ``failed``: when the job failed or was dismissed; skipped when it succeeded.

A failed attempt (no answer, a timeout, a non-2xx status) is retried after an
exponential backoff (:class:`RetryPolicy`); after the last attempt the delivery is
``gave_up``. Nothing here ever changes the job.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from jobcell.errors import DuplicateError, SpecError
from jobcell.model.states import JobState
from jobcell.store import NewEvent
from jobcell.store.base import Changes, DeliveryRow

if TYPE_CHECKING:
    from jobcell.service import Cell

# Delivery kinds, in the order they are recorded (and sent, within one job).
KINDS = ("inProgress", "success", "failed")
SUBSCRIBED_EVENT = "subscribed"
MAX_URI_LENGTH = 2000

Action = Literal["wait", "due", "send", "skip"]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a callback is sent.

    Attempt ``n`` (1-based) that fails is retried after ``backoff_s * factor**(n-1)``
    seconds (at most ``max_backoff_s``); the defaults give 1, 2, 4, 8 and 16 s between
    six attempts. ``timeout_s`` bounds one POST (connect, send and answer).
    """

    max_attempts: int = 6
    backoff_s: float = 1.0
    factor: float = 2.0
    max_backoff_s: float = 300.0
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("a retry policy needs at least one attempt")
        if self.backoff_s < 0 or self.factor < 1 or self.timeout_s <= 0:
            raise ValueError("backoff_s must be >= 0, factor >= 1 and timeout_s > 0")

    def delay_after(self, attempts: int) -> float | None:
        """Seconds to wait after ``attempts`` failed attempts, or None: give up."""
        if attempts >= self.max_attempts:
            return None
        return min(self.backoff_s * self.factor ** (attempts - 1), self.max_backoff_s)

    @classmethod
    def from_settings(cls, settings: Any) -> RetryPolicy:
        """The policy from the cell options ``callback_max_attempts``,
        ``callback_backoff_s`` and ``callback_timeout_s`` where the cell has them."""
        default = cls()
        return cls(max_attempts=int(getattr(settings, "callback_max_attempts",
                                            default.max_attempts)),
                   backoff_s=float(getattr(settings, "callback_backoff_s", default.backoff_s)),
                   timeout_s=float(getattr(settings, "callback_timeout_s", default.timeout_s)))


@dataclass(frozen=True)
class Decision:
    """What to do with one open delivery now (``reason`` says why for ``skip``)."""

    action: Action
    reason: str | None = None


def decide(kind: str, state: str, next_at: float | None, job_state: str | None,
           now: float) -> Decision:
    """Pure: what an open delivery (``waiting`` or ``due``) should do now.

    ``job_state`` is the job's state, or None when the job no longer exists.
    ``due`` means "its trigger happened: mark it due (and send it)"; ``send`` means
    "it is due and its time has come".
    """
    if state == "due":
        return Decision("send" if next_at is None or next_at <= now else "wait")
    if state != "waiting":
        return Decision("wait")   # done, gave_up, skipped: nothing more to do
    if job_state is None:
        return Decision("skip", "the job no longer exists")
    ended = job_state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
    if kind == "inProgress":
        if job_state == JobState.RUNNING:
            return Decision("due")
        if ended:
            return Decision("skip", f"the job was already {job_state} when it was seen")
        return Decision("wait")
    if kind == "success":
        if job_state == JobState.SUCCEEDED:
            return Decision("due")
        return Decision("skip", f"the job {job_state}") if ended else Decision("wait")
    if kind == "failed":
        if job_state in (JobState.FAILED, JobState.CANCELLED):
            return Decision("due")
        return Decision("skip", f"the job {job_state}") if ended else Decision("wait")
    return Decision("skip", f"unknown callback kind {kind!r}")


def check_uri(uri: str, field: str) -> str:
    """A callback URI must be an absolute ``http`` or ``https`` URL."""
    if not isinstance(uri, str) or not uri or len(uri) > MAX_URI_LENGTH:
        raise SpecError(f"{field} must be an http(s) URL of at most {MAX_URI_LENGTH} "
                        "characters")
    if any(ord(c) < 33 for c in uri):
        raise SpecError(f"{field} must not contain spaces or control characters")
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise SpecError(f"{field} {uri[:80]!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SpecError(f"{field} {uri[:80]!r} must be an absolute http:// or https:// URL")
    return uri


def subscribe(cell: Cell, job_id: str, uris: Mapping[str, str | None], *, owner: str,
              base_url: str) -> dict[str, str]:
    """Record a job's callbacks (kind -> URI; None or absent kinds are left out).

    ``base_url`` is the server's URL as the client saw it: the bodies sent later link
    to the job and its files under it. A job that already has callbacks (an identical
    execution that was deduplicated to it) keeps them: the same URIs are accepted
    again, other ones raise :class:`DuplicateError`.
    """
    cell.status(job_id, owner=owner)   # NotFoundError unless it is the owner's job
    wanted = {kind: check_uri(uri, f"{kind}Uri") for kind in KINDS
              if (uri := uris.get(kind)) is not None}
    if not wanted:
        return {}
    existing = {row.kind: row.uri for row in cell.store.deliveries(job_id)}
    if existing:
        if existing != wanted:
            raise DuplicateError(
                f"job {job_id} (an identical execution of yours, reused) already has "
                "other subscriber callbacks; change an input or wait for it to end")
        return wanted
    cell.store.add_deliveries(job_id, wanted)
    cell.store.apply(Changes(events=[NewEvent(
        job_id, SUBSCRIBED_EVENT, time.time(), None,
        {"callbacks": list(wanted), "base_url": base_url.rstrip("/")})]))
    return wanted


def base_url_of(cell: Cell, job_id: str) -> str | None:
    """The server URL recorded when the job's callbacks were subscribed."""
    for event in cell.store.events(job_id):
        if event.kind == SUBSCRIBED_EVENT and event.data.get("base_url"):
            return str(event.data["base_url"])
    return None


def due_deliveries(cell: Cell, now: float | None = None,
                   limit: int = 500) -> list[DeliveryRow]:
    """Settle the open deliveries against their jobs' states and return the ones to
    send now (oldest first): triggered ones become ``due``, moot ones ``skipped``."""
    now = time.time() if now is None else now
    rows = cell.store.open_deliveries(limit)
    states: dict[str, str | None] = {}
    ready: list[DeliveryRow] = []
    for row in rows:
        if row.job_id not in states:
            job = cell.store.get_job(row.job_id, with_steps=False)
            states[row.job_id] = None if job is None else str(job.state)
        decision = decide(row.kind, row.state, row.next_at, states[row.job_id], now)
        if decision.action == "skip":
            cell.store.update_delivery(row.seq, state="skipped", last_error=decision.reason)
        elif decision.action == "due":
            cell.store.update_delivery(row.seq, state="due", next_at=now)
            ready.append(replace(row, state="due", next_at=now))
        elif decision.action == "send":
            ready.append(row)
    return ready


def record_attempt(cell: Cell, row: DeliveryRow, error: str | None, policy: RetryPolicy,
                   now: float | None = None) -> str:
    """Record one delivery attempt (``error`` None: delivered); answer the new state."""
    now = time.time() if now is None else now
    attempts = row.attempts + 1
    if error is None:
        cell.store.update_delivery(row.seq, state="done", attempts=attempts, next_at=None,
                                   delivered_at=now)
        _event(cell, row, "callback_delivered", now, attempts=attempts)
        return "done"
    error = error[:500]
    delay = policy.delay_after(attempts)
    if delay is None:
        cell.store.update_delivery(row.seq, state="gave_up", attempts=attempts, next_at=None,
                                   last_error=error)
        _event(cell, row, "callback_gave_up", now, attempts=attempts, error=error)
        return "gave_up"
    cell.store.update_delivery(row.seq, state="due", attempts=attempts, next_at=now + delay,
                               last_error=error)
    return "due"


def skip(cell: Cell, row: DeliveryRow, reason: str) -> None:
    """Give up a delivery that can no longer be sent (its job was removed)."""
    cell.store.update_delivery(row.seq, state="skipped", next_at=None, last_error=reason)


def deliveries(cell: Cell, job_id: str, *, owner: str | None = None) -> list[dict[str, Any]]:
    """A job's callbacks and how their delivery went (the owner's job only)."""
    from jobcell.service import iso

    cell.status(job_id, owner=owner)
    return [{"kind": r.kind, "uri": r.uri, "state": r.state, "attempts": r.attempts,
             "next_at": iso(r.next_at), "last_error": r.last_error,
             "delivered_at": iso(r.delivered_at)} for r in cell.store.deliveries(job_id)]


def _event(cell: Cell, row: DeliveryRow, kind: str, now: float, **data: Any) -> None:
    cell.store.apply(Changes(events=[NewEvent(row.job_id, kind, now, None,
                                              {"callback": row.kind, **data})]))
