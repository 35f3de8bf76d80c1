"""Subscriber callbacks: when each kind is due, the retry policy, URI checks, and the
store transitions the service functions make."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from jobcell import subscribers
from jobcell.errors import DuplicateError, NotFoundError, SpecError
from jobcell.service import Cell
from jobcell.store.base import Changes, JobUpdate
from jobcell.subscribers import Decision, RetryPolicy, check_uri, decide

NOW = 1000.0


@pytest.mark.parametrize("kind,job_state,action", [
    ("inProgress", "queued", "wait"), ("inProgress", "running", "due"),
    ("inProgress", "succeeded", "skip"), ("inProgress", "failed", "skip"),
    ("inProgress", "cancelled", "skip"),
    ("success", "queued", "wait"), ("success", "running", "wait"),
    ("success", "succeeded", "due"), ("success", "failed", "skip"),
    ("success", "cancelled", "skip"),
    ("failed", "queued", "wait"), ("failed", "running", "wait"),
    ("failed", "failed", "due"), ("failed", "cancelled", "due"),
    ("failed", "succeeded", "skip"),
])
def test_when_a_waiting_delivery_is_due(kind: str, job_state: str, action: str) -> None:
    assert decide(kind, "waiting", None, job_state, NOW).action == action


def test_skips_say_why() -> None:
    assert decide("inProgress", "waiting", None, "succeeded", NOW) == Decision(
        "skip", "the job was already succeeded when it was seen")
    assert decide("success", "waiting", None, None, NOW) == Decision(
        "skip", "the job no longer exists")
    assert decide("bogus", "waiting", None, "running", NOW).action == "skip"


def test_a_due_delivery_is_sent_when_its_time_comes() -> None:
    assert decide("success", "due", NOW, "succeeded", NOW).action == "send"
    assert decide("success", "due", None, "succeeded", NOW).action == "send"
    assert decide("success", "due", NOW + 1, "succeeded", NOW).action == "wait"
    # Once triggered it goes out even if the job moved on (or was removed) since.
    assert decide("inProgress", "due", NOW - 1, "succeeded", NOW).action == "send"
    assert decide("inProgress", "due", NOW - 1, None, NOW).action == "send"


@pytest.mark.parametrize("state", ["done", "gave_up", "skipped"])
def test_closed_deliveries_stay_closed(state: str) -> None:
    assert decide("success", state, None, "succeeded", NOW).action == "wait"


def test_default_backoff_is_1_2_4_8_16_then_give_up() -> None:
    policy = RetryPolicy()
    assert [policy.delay_after(n) for n in range(1, 7)] == [1, 2, 4, 8, 16, None]


def test_backoff_is_capped_and_configurable() -> None:
    policy = RetryPolicy(max_attempts=10, backoff_s=0.5, factor=3, max_backoff_s=5)
    assert [policy.delay_after(n) for n in range(1, 5)] == [0.5, 1.5, 4.5, 5]
    assert RetryPolicy(max_attempts=1).delay_after(1) is None
    with pytest.raises(ValueError, match="at least one attempt"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="timeout_s > 0"):
        RetryPolicy(timeout_s=0)


def test_policy_from_settings_uses_the_options_a_cell_has() -> None:
    assert RetryPolicy.from_settings(SimpleNamespace()) == RetryPolicy()
    tuned = RetryPolicy.from_settings(SimpleNamespace(
        callback_max_attempts=3, callback_backoff_s=0.25, callback_timeout_s=2))
    assert (tuned.max_attempts, tuned.backoff_s, tuned.timeout_s) == (3, 0.25, 2.0)


@pytest.mark.parametrize("uri", ["http://127.0.0.1:8080/cb", "https://example.org/a?b=c",
                                 "http://[::1]:9/x"])
def test_valid_callback_uris(uri: str) -> None:
    assert check_uri(uri, "successUri") == uri


@pytest.mark.parametrize("uri,problem", [
    ("", "must be an http"), ("ftp://example.org/x", "absolute http"),
    ("/relative", "absolute http"), ("http://", "absolute http"),
    ("http://example.org/a b", "spaces"), ("http://example.org:99999/", "not a valid URL"),
    ("http://example.org/" + "x" * 2000, "at most 2000"),
    ("file:///etc/passwd", "absolute http"),
])
def test_invalid_callback_uris(uri: str, problem: str) -> None:
    with pytest.raises(SpecError, match=problem):
        check_uri(uri, "successUri")


@pytest.fixture
def cell(tmp_path: Path) -> Cell:
    cell = Cell(tmp_path / "cell", auto_worker=False)
    cell.register_runner({"name": "noop", "command": "true"})
    yield cell  # type: ignore[misc]
    cell.close()


def set_state(cell: Cell, job_id: str, state: str) -> None:
    cell.store.apply(Changes(jobs=[JobUpdate(job_id, {"state": state})]))


def submit(cell: Cell, owner: str = "ann", n: int = 0) -> str:
    return cell.submit({"label": f"t{n}", "steps": [{"runner": "noop"}]}, owner=owner).job_id


URIS = {"inProgress": "http://127.0.0.1:1/run", "success": "http://127.0.0.1:1/ok",
        "failed": None}


def test_subscribe_records_the_kinds_given_and_the_server_url(cell: Cell) -> None:
    job_id = submit(cell)
    assert subscribers.subscribe(cell, job_id, URIS, owner="ann",
                                 base_url="http://srv/") == {
        "inProgress": URIS["inProgress"], "success": URIS["success"]}
    rows = subscribers.deliveries(cell, job_id, owner="ann")
    assert [(r["kind"], r["state"], r["attempts"]) for r in rows] == [
        ("inProgress", "waiting", 0), ("success", "waiting", 0)]
    assert subscribers.base_url_of(cell, job_id) == "http://srv"
    # Again with the same URIs is fine; other URIs would be lost: refused.
    subscribers.subscribe(cell, job_id, URIS, owner="ann", base_url="http://srv")
    with pytest.raises(DuplicateError, match="other subscriber callbacks"):
        subscribers.subscribe(cell, job_id, {"success": "http://elsewhere/"}, owner="ann",
                              base_url="http://srv")
    with pytest.raises(NotFoundError):
        subscribers.subscribe(cell, job_id, URIS, owner="bob", base_url="http://srv")
    with pytest.raises(NotFoundError):
        subscribers.deliveries(cell, job_id, owner="bob")


def test_due_deliveries_follow_the_job(cell: Cell) -> None:
    job_id = submit(cell)
    subscribers.subscribe(cell, job_id, {**URIS, "failed": "http://127.0.0.1:1/bad"},
                          owner="ann", base_url="http://srv")
    assert subscribers.due_deliveries(cell, NOW) == []          # queued: nothing yet
    set_state(cell, job_id, "running")
    [running] = subscribers.due_deliveries(cell, NOW)
    assert (running.kind, running.state, running.next_at) == ("inProgress", "due", NOW)
    set_state(cell, job_id, "succeeded")
    due = subscribers.due_deliveries(cell, NOW + 1)
    assert [d.kind for d in due] == ["inProgress", "success"]   # in order, still both
    states = {d["kind"]: d["state"] for d in subscribers.deliveries(cell, job_id)}
    assert states == {"inProgress": "due", "success": "due", "failed": "skipped"}


def test_a_job_that_ends_before_it_is_seen_running_skips_in_progress(cell: Cell) -> None:
    job_id = submit(cell)
    subscribers.subscribe(cell, job_id, URIS, owner="ann", base_url="http://srv")
    set_state(cell, job_id, "cancelled")
    assert subscribers.due_deliveries(cell, NOW) == []
    rows = {d["kind"]: d for d in subscribers.deliveries(cell, job_id)}
    assert rows["inProgress"]["state"] == rows["success"]["state"] == "skipped"
    assert rows["success"]["last_error"] == "the job cancelled"


def test_attempts_back_off_then_give_up(cell: Cell) -> None:
    job_id = submit(cell)
    subscribers.subscribe(cell, job_id, {"success": URIS["success"]}, owner="ann",
                          base_url="http://srv")
    set_state(cell, job_id, "succeeded")
    policy = RetryPolicy(max_attempts=3, backoff_s=10)
    [row] = subscribers.due_deliveries(cell, NOW)
    assert subscribers.record_attempt(cell, row, "HTTP 500", policy, NOW) == "due"
    assert subscribers.due_deliveries(cell, NOW + 9) == []       # backing off
    [row] = subscribers.due_deliveries(cell, NOW + 10)
    assert row.attempts == 1
    assert subscribers.record_attempt(cell, row, "HTTP 502", policy, NOW + 10) == "due"
    [row] = subscribers.due_deliveries(cell, NOW + 30)            # 10 s, then 20 s
    assert subscribers.record_attempt(cell, row, "refused", policy, NOW + 30) == "gave_up"
    assert subscribers.due_deliveries(cell, NOW + 10**6) == []
    [final] = subscribers.deliveries(cell, job_id)
    assert (final["state"], final["attempts"], final["last_error"]) == ("gave_up", 3,
                                                                        "refused")
    assert cell.events(job_id)[-1]["kind"] == "callback_gave_up"
    assert cell.status(job_id)["state"] == "succeeded"            # the job is untouched


def test_a_delivered_callback_is_done(cell: Cell) -> None:
    job_id = submit(cell)
    subscribers.subscribe(cell, job_id, {"success": URIS["success"]}, owner="ann",
                          base_url="http://srv")
    set_state(cell, job_id, "succeeded")
    [row] = subscribers.due_deliveries(cell, NOW)
    assert subscribers.record_attempt(cell, row, None, RetryPolicy(), NOW) == "done"
    [final] = subscribers.deliveries(cell, job_id)
    assert (final["state"], final["attempts"]) == ("done", 1)
    assert final["delivered_at"] is not None
    assert cell.events(job_id)[-1] == {**cell.events(job_id)[-1], "kind": "callback_delivered",
                                       "callback": "success", "attempts": 1}


def test_deliveries_of_removed_jobs_are_skipped(cell: Cell) -> None:
    job_id = submit(cell)
    set_state(cell, job_id, "succeeded")
    cell.store.delete_jobs([job_id])              # jobcell gc takes the deliveries too
    assert cell.store.deliveries(job_id) == []
    cell.store.add_deliveries("gone-job", {"success": URIS["success"]})
    assert subscribers.due_deliveries(cell, NOW) == []
    [row] = cell.store.deliveries("gone-job")
    assert (row.state, row.last_error) == ("skipped", "the job no longer exists")


def test_a_due_delivery_is_claimed_once(cell: Cell) -> None:
    job_id = submit(cell)
    subscribers.subscribe(cell, job_id, {"success": URIS["success"]}, owner="ann",
                          base_url="http://srv")
    set_state(cell, job_id, "succeeded")
    [row] = subscribers.due_deliveries(cell, NOW)
    claimed = subscribers.claim(cell, row, 30, NOW)
    assert claimed is not None and claimed.next_at == NOW + 30
    assert subscribers.claim(cell, row, 30, NOW) is None           # a stale read: nothing
    assert subscribers.due_deliveries(cell, NOW + 29) == []         # leased while it is sent
    [again] = subscribers.due_deliveries(cell, NOW + 30)            # its sender died: again
    assert subscribers.release(cell, claimed, NOW + 1)              # or it was handed back
    assert subscribers.due_deliveries(cell, NOW + 1) == [
        subscribers.DeliveryRow(**{**again.__dict__, "next_at": NOW + 1})]


def test_a_stale_attempt_never_overwrites_a_recorded_one(cell: Cell) -> None:
    job_id = submit(cell)
    subscribers.subscribe(cell, job_id, {"success": URIS["success"]}, owner="ann",
                          base_url="http://srv")
    set_state(cell, job_id, "succeeded")
    [row] = subscribers.due_deliveries(cell, NOW)
    policy = RetryPolicy(max_attempts=1)
    assert subscribers.record_attempt(cell, row, None, policy, NOW) == "done"
    assert subscribers.claim(cell, row, 30, NOW) is None            # never sent again
    assert subscribers.record_attempt(cell, row, "HTTP 500", policy, NOW) == "done"
    subscribers.skip(cell, row, "stale")
    [final] = subscribers.deliveries(cell, job_id)
    assert (final["state"], final["attempts"], final["last_error"]) == ("done", 1, None)
    kinds = [e["kind"] for e in cell.events(job_id)]
    assert kinds.count("callback_delivered") == 1 and "callback_gave_up" not in kinds


def test_every_waiting_delivery_is_settled_past_the_page_size(cell: Cell) -> None:
    jobs = [submit(cell, n=n) for n in range(7)]
    for job_id in jobs:
        subscribers.subscribe(cell, job_id, URIS, owner="ann", base_url="http://srv")
    set_state(cell, jobs[-1], "running")
    set_state(cell, jobs[-2], "cancelled")
    [row] = subscribers.due_deliveries(cell, NOW, limit=2)         # pages of two rows
    assert (row.job_id, row.kind) == (jobs[-1], "inProgress")
    states = {d["kind"]: d["state"] for d in subscribers.deliveries(cell, jobs[-2])}
    assert states == {"inProgress": "skipped", "success": "skipped"}


def test_the_sender_reads_use_the_partial_indexes(cell: Cell) -> None:
    conn = cell.store._conn()
    seen: list[str] = []
    conn.set_trace_callback(seen.append)     # the SQL as run, with its values
    try:
        cell.store.due_delivery_rows(NOW, 5)
        cell.store.waiting_delivery_rows(subscribers.QUIET_STATES, 0, 5)
    finally:
        conn.set_trace_callback(None)
    due, waiting = (" ".join(" ".join(map(str, tuple(r)))
                             for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
                    for sql in seen)
    assert "USING INDEX deliveries_due" in due and "SCAN" not in due
    assert "USING INDEX deliveries_waiting" in waiting and "SCAN" not in waiting
