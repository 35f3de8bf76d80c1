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

import logging
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
log = logging.getLogger("jobcell.subscribers")


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


# Job states in which no waiting delivery of any kind changes (read past every poll).
QUIET_STATES = frozenset(str(state) for state in JobState
                         if all(decide(kind, "waiting", None, str(state), 0).action == "wait"
                                for kind in KINDS))


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
    """Settle the waiting deliveries against their jobs' states (triggered ones become
    ``due``, moot ones ``skipped``) and return the ones to send now: at most ``limit``
    due ones whose time has come, earliest first.

    Every waiting delivery is looked at (in pages of ``limit``), except those of jobs in
    :data:`QUIET_STATES`, so a pile of queued jobs never hides a newer job's callback.
    One row that cannot be settled is logged and left for the next call.
    """
    now = time.time() if now is None else now
    after = 0
    while True:
        page = cell.store.waiting_delivery_rows(QUIET_STATES, after, limit)
        for row, job_state in page:
            try:
                _settle(cell, row, job_state, now)
            except Exception:   # one bad row never stops the others
                log.exception("could not settle callback %s of job %s", row.kind,
                              row.job_id)
        if len(page) < limit:
            break
        after = page[-1][0].seq
    return cell.store.due_delivery_rows(now, limit)


def _settle(cell: Cell, row: DeliveryRow, job_state: str | None, now: float) -> None:
    decision = decide(row.kind, row.state, row.next_at, job_state, now)
    if decision.action == "skip":
        cell.store.update_delivery(row.seq, only_if={"state": "waiting"}, state="skipped",
                                   next_at=None, last_error=decision.reason)
    elif decision.action == "due":
        cell.store.update_delivery(row.seq, only_if={"state": "waiting"}, state="due",
                                   next_at=now)


def claim(cell: Cell, row: DeliveryRow, lease_s: float,
          now: float | None = None) -> DeliveryRow | None:
    """Take a due delivery for sending (atomically: a stale read of it, or another
    sender, gets None). It stays ``due`` with ``next_at`` ``lease_s`` ahead, so a sender
    that dies before recording the attempt leaves it to be sent again then."""
    now = time.time() if now is None else now
    until = now + lease_s
    if not cell.store.claim_delivery(row.seq, row.attempts, now, until):
        return None
    return replace(row, state="due", next_at=until)


def release(cell: Cell, row: DeliveryRow, now: float | None = None) -> bool:
    """Hand back a claimed delivery that was not sent (the sender stopped): due now."""
    now = time.time() if now is None else now
    return cell.store.update_delivery(
        row.seq, only_if={"state": "due", "attempts": row.attempts, "next_at": row.next_at},
        next_at=now)


def record_attempt(cell: Cell, row: DeliveryRow, error: str | None, policy: RetryPolicy,
                   now: float | None = None) -> str:
    """Record one delivery attempt (``error`` None: delivered); answer the new state.

    Only a row still ``due`` with the attempts ``row`` shows is changed: an attempt made
    from a stale read never overwrites a delivery recorded meanwhile (``done`` stays
    ``done``); then the row's current state is answered and nothing is recorded.
    """
    now = time.time() if now is None else now
    attempts = row.attempts + 1
    expect = {"state": "due", "attempts": row.attempts}
    if error is None:
        if not cell.store.update_delivery(row.seq, only_if=expect, state="done",
                                          attempts=attempts, next_at=None,
                                          delivered_at=now):
            return _current_state(cell, row)
        _event(cell, row, "callback_delivered", now, attempts=attempts)
        return "done"
    error = error[:500]
    delay = policy.delay_after(attempts)
    if delay is None:
        if not cell.store.update_delivery(row.seq, only_if=expect, state="gave_up",
                                          attempts=attempts, next_at=None,
                                          last_error=error):
            return _current_state(cell, row)
        _event(cell, row, "callback_gave_up", now, attempts=attempts, error=error)
        return "gave_up"
    if not cell.store.update_delivery(row.seq, only_if=expect, state="due",
                                      attempts=attempts, next_at=now + delay,
                                      last_error=error):
        return _current_state(cell, row)
    return "due"


def _current_state(cell: Cell, row: DeliveryRow) -> str:
    for current in cell.store.deliveries(row.job_id):
        if current.seq == row.seq:
            return current.state
    return "gone"


def skip(cell: Cell, row: DeliveryRow, reason: str) -> None:
    """Give up a delivery that can no longer be sent (its job was removed); a row
    recorded meanwhile (``row`` is stale) is left alone."""
    cell.store.update_delivery(row.seq, only_if={"state": row.state,
                                                 "attempts": row.attempts},
                               state="skipped", next_at=None, last_error=reason)


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
