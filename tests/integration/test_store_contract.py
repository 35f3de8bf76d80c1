"""The Store contract: every store implementation must pass this suite.

The tests talk to a store only through the :class:`jobcell.store.Store`
protocol. A store factory opens a new store instance on one backing database
each time it is called, so "another process opens the same cell" is the same
test for every backend. Add a factory to ``STORE_FACTORIES`` to run the suite
against a new backend (the PostgreSQL store will be added here).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from jobcell.model.states import JobState, StepState
from jobcell.store import (
    AttemptRow,
    Changes,
    ConflictError,
    CooldownRow,
    FileHash,
    JobRow,
    LockInfo,
    LockLostError,
    NewEvent,
    OutputRow,
    StepRow,
    Store,
)
from jobcell.store.base import JobUpdate, StepUpdate
from jobcell.store.sqlite import SQLiteStore

StoreFactory = Callable[[], Store]


def _sqlite_factory(tmp_path: Path) -> StoreFactory:
    path = tmp_path / "contract" / "state.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return lambda: SQLiteStore(path)


STORE_FACTORIES: dict[str, Callable[[Path], StoreFactory]] = {
    "sqlite": _sqlite_factory,
}


@pytest.fixture(params=sorted(STORE_FACTORIES))
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens store instances on one fresh backing database; closes them all at the end."""
    make = STORE_FACTORIES[request.param](tmp_path)
    opened: list[Store] = []

    def factory() -> Store:
        store = make()
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: StoreFactory) -> Store:
    return open_store()


# -- builders -----------------------------------------------------------------------------

def make_step(job_id: str, step_id: str, index: int = 0, *, runner: str = "r",
              state: StepState = StepState.QUEUED, priority: int = 0, owner: str = "alice",
              inputs: list[str] | None = None, **fields: Any) -> StepRow:
    return StepRow(job_id=job_id, step_id=step_id, index=index, runner=runner,
                   runner_hash=f"hash-{runner}", runner_def={"name": runner, "nested": {"a": [1]}},
                   params={"n": index, "text": "é'\"; $(x)"}, inputs=inputs or [],
                   input_layout="nested", cache=True, cpu_slots=1, memory_mb=100,
                   timeout_s=30.5, retries=2, state=state, priority=priority, owner=owner,
                   **fields)


def make_job(job_id: str, *, label: str = "demo", owner: str = "alice",
             tags: list[str] | None = None, state: JobState = JobState.QUEUED,
             created_at: float = 1000.0, priority: int = 0, spec_hash: str | None = None,
             steps: int = 1, step_state: StepState = StepState.QUEUED) -> JobRow:
    job = JobRow(job_id=job_id, label=label, owner=owner, tags=tags or [], priority=priority,
                 state=state, spec={"label": label, "steps": [{"runner": "r"}]},
                 spec_hash=spec_hash or f"spec-{job_id}", created_at=created_at,
                 updated_at=created_at)
    job.steps = [make_step(job_id, f"s{i}", i, state=step_state, priority=priority, owner=owner)
                 for i in range(steps)]
    return job


def insert(store: Store, *jobs: JobRow) -> None:
    store.insert_jobs(list(jobs), [NewEvent(j.job_id, "submitted", j.created_at) for j in jobs])


def lock(token: str, now: float = 100.0, pid: int = 4242) -> LockInfo:
    return LockInfo(token=token, pid=pid, hostname="host-a", started_at=now, heartbeat_at=now)


# -- jobs ---------------------------------------------------------------------------------

def test_insert_and_get_job_round_trips_every_field(store: Store) -> None:
    job = make_job("j1", tags=["b", "a"], priority=3, steps=2)
    job.steps[1].inputs = ["s0"]
    job.steps[1].state = StepState.PENDING
    insert(store, job)

    got = store.get_job("j1")
    assert got is not None
    assert (got.job_id, got.label, got.owner, got.tags, got.priority, got.state) == (
        "j1", "demo", "alice", ["b", "a"], 3, JobState.QUEUED)
    assert got.spec == job.spec and got.spec_hash == "spec-j1"
    assert (got.created_at, got.updated_at, got.finished_at) == (1000.0, 1000.0, None)
    assert got.cancel_requested is False and got.error is None
    assert [s.step_id for s in got.steps] == ["s0", "s1"]
    first, second = got.steps
    assert isinstance(first.state, StepState) and first.state == StepState.QUEUED
    assert second.state == StepState.PENDING and second.inputs == ["s0"]
    assert first.runner_def == {"name": "r", "nested": {"a": [1]}}
    assert first.params == {"n": 0, "text": "é'\"; $(x)"}
    assert (first.cache, first.cpu_slots, first.memory_mb, first.timeout_s, first.retries) == (
        True, 1, 100, 30.5, 2)
    assert (first.attempt, first.failures, first.exit_code, first.pid, first.not_before) == (
        0, 0, None, None, None)
    assert first.priority == 3 and first.owner == "alice"
    assert first.seq < second.seq


def test_get_job_unknown_and_without_steps(store: Store) -> None:
    insert(store, make_job("j1", steps=3))
    assert store.get_job("nope") is None
    bare = store.get_job("j1", with_steps=False)
    assert bare is not None and bare.steps == []


def test_insert_jobs_is_all_or_none(store: Store) -> None:
    insert(store, make_job("j1"))
    with pytest.raises(Exception):  # noqa: B017 - the backend's integrity error
        insert(store, make_job("j2"), make_job("j1"))
    assert store.get_job("j2") is None
    assert store.count_jobs() == 1
    assert [e.kind for e in store.events("j2")] == []


def test_list_jobs_filters_newest_first_and_pages(store: Store) -> None:
    insert(store,
           make_job("a", label="x", owner="alice", tags=["t1"], created_at=1.0),
           make_job("b", label="x", owner="bob", tags=["t1", "t2"], created_at=2.0,
                    state=JobState.RUNNING),
           make_job("c", label="y", owner="alice", tags=["t2"], created_at=3.0,
                    state=JobState.SUCCEEDED))
    insert(store, make_job("d", label="x", owner="alice", created_at=4.0,
                           state=JobState.FAILED))

    def ids(**kw: Any) -> list[str]:
        return [j.job_id for j in store.list_jobs(**kw)]

    assert ids() == ["d", "c", "b", "a"]
    assert ids(label="x") == ["d", "b", "a"]
    assert ids(state=JobState.RUNNING) == ["b"]
    assert ids(tag="t1") == ["b", "a"]
    assert ids(tag="t") == []                 # a tag filter is exact, not a prefix
    assert ids(owner="alice") == ["d", "c", "a"]
    assert ids(label="x", owner="alice", tag="t1") == ["a"]
    assert ids(limit=2) == ["d", "c"]
    assert ids(limit=2, offset=2) == ["b", "a"]
    assert ids(limit=2, offset=4) == []


def test_list_job_summaries_match_list_jobs(store: Store) -> None:
    """The summary list answers the same jobs in the same order as list_jobs, with the
    fields a list shows (exact timestamps, the state as its string), and no spec."""
    created = 1_763_712_345.9009995   # not a short decimal: the exact float must survive
    insert(store,
           make_job("a", label="x", owner="alice", tags=["t1", "é"], created_at=1.0),
           make_job("b", label="x", owner="bob", tags=["t1", "t2"], created_at=2.0,
                    state=JobState.RUNNING, priority=5),
           make_job("c", label="y", owner="alice", created_at=created,
                    state=JobState.SUCCEEDED),
           make_job("d", label="x", owner="alice", created_at=created,
                    state=JobState.FAILED))
    store.apply(Changes(jobs=[JobUpdate("d", {"finished_at": created + 0.25,
                                              "error": 'step "s0" failed:\nexit 3'})]))
    filters: list[dict[str, Any]] = [
        {}, {"label": "x"}, {"state": JobState.RUNNING}, {"tag": "t1"}, {"tag": "t"},
        {"owner": "alice"}, {"label": "x", "owner": "alice", "tag": "t1"}, {"limit": 2},
        {"limit": 2, "offset": 2}, {"limit": 2, "offset": 4}, {"owner": "nobody"}]
    for kw in filters:
        full = store.list_jobs(**kw)
        brief = store.list_job_summaries(**kw)
        assert [s.job_id for s in brief] == [j.job_id for j in full], kw
        for summary, job in zip(brief, full, strict=True):
            assert summary == (job.job_id, job.label, job.owner, job.tags, job.priority,
                               str(job.state), job.created_at, job.finished_at, job.error)
    d = store.list_job_summaries(label="x", owner="alice", limit=1)[0]
    assert (d.job_id, d.state, d.created_at, d.finished_at) == (
        "d", "failed", created, created + 0.25)
    assert type(d.state) is str and d.error == 'step "s0" failed:\nexit 3'
    a = store.list_job_summaries(tag="é")[0]
    assert (a.job_id, a.tags, a.priority, a.finished_at, a.error) == (
        "a", ["t1", "é"], 0, None, None)
    assert not hasattr(a, "spec")


def _times_and_texts() -> list[tuple[float, float | None, str | None]]:
    """(created_at, finished_at, error) of jobs whose summaries must round-trip exactly:
    random times of today's magnitude, and odd ones (0, tiny, negative, huge)."""
    import random

    rng = random.Random(7)
    texts = [None, "nul \x00 and bell \x07", 'emoji 😀 \\ / "q" \u2028\n\t', "é" * 300]
    rows: list[tuple[float, float | None, str | None]] = [
        (rng.uniform(1.6e9, 2.0e9), rng.uniform(1.6e9, 2.0e9), texts[i % len(texts)])
        for i in range(150)]
    rows += [(0.0, None, "nul \x00 and bell \x07"), (1e-5, 0.5, "tiny"),
             (-12.25, 1.0000000000000002, "negative"), (2.0**60 + 4096, None, "huge"),
             (0.0009765625, 1e15 + 0.125, 'emoji 😀 \\ / "q" \u2028')]
    return rows


def test_list_job_summaries_times_and_texts_are_exact(store: Store) -> None:
    """Timestamps come back as the very floats stored, texts as the very strings, also
    when a page holds times far from today's."""
    rows = _times_and_texts()
    jobs = []
    for i, (created, _finished, _error) in enumerate(rows):
        jobs.append(make_job(f"j{i:03d}", label="odd" if i >= 150 else "now",
                             tags=[f"t{i}", "ü"], created_at=created))
    insert(store, *jobs)
    store.apply(Changes(jobs=[JobUpdate(f"j{i:03d}", {"finished_at": finished, "error": error})
                              for i, (_c, finished, error) in enumerate(rows)]))
    for label in ("now", "odd", None):
        full = store.list_jobs(label=label, limit=1000)
        brief = store.list_job_summaries(label=label, limit=1000)
        assert len(brief) == len(full) > 0
        for summary, job in zip(brief, full, strict=True):
            assert summary == (job.job_id, job.label, job.owner, job.tags, job.priority,
                               str(job.state), job.created_at, job.finished_at, job.error)
    odd = {s.job_id: s for s in store.list_job_summaries(label="odd")}
    for i, (created, finished, error) in enumerate(rows[150:], start=150):
        got = odd[f"j{i:03d}"]
        assert (got.created_at, got.finished_at, got.error) == (created, finished, error)


def test_sqlite_summaries_without_json_functions(tmp_path: Path) -> None:
    """An SQLite without its JSON functions reads the summaries row by row: the same."""
    store = SQLiteStore(tmp_path / "state.db")
    try:
        rows = _times_and_texts()
        insert(store, *(make_job(f"j{i:03d}", created_at=c, tags=["x"])
                        for i, (c, _f, _e) in enumerate(rows)))
        fast = store.list_job_summaries(limit=1000)
        store._json_pages = False
        assert store.list_job_summaries(limit=1000) == fast
        assert [s.job_id for s in fast] == [j.job_id for j in store.list_jobs(limit=1000)]
    finally:
        store.close()


def test_count_jobs_by_states_owner_and_tag_glob(store: Store) -> None:
    insert(store,
           make_job("a", owner="alice", tags=["proj-1", "x"]),
           make_job("b", owner="bob", tags=["proj-2"], state=JobState.RUNNING),
           make_job("c", owner="alice", tags=["other"], state=JobState.SUCCEEDED),
           make_job("d", owner="alice", tags=["proj-10", "proj-11"], state=JobState.FAILED))
    active = [JobState.QUEUED, JobState.RUNNING]
    assert store.count_jobs() == 4
    assert store.count_jobs(states=active) == 2
    assert store.count_jobs(states=[]) == 0
    assert store.count_jobs(owner="alice") == 3
    assert store.count_jobs(states=active, owner="alice") == 1
    assert store.count_jobs(tag_pattern="proj-*") == 3   # d counted once despite two tags
    assert store.count_jobs(tag_pattern="proj-?") == 2
    assert store.count_jobs(tag_pattern="proj-*", states=active, owner="bob") == 1
    assert store.count_jobs(tag_pattern="nothing*") == 0


def test_job_ids_by_tag_glob_states_oldest_first(store: Store) -> None:
    insert(store,
           make_job("new", tags=["study:7", "study:8"], created_at=30.0),
           make_job("old", tags=["study:7"], created_at=10.0, state=JobState.FAILED),
           make_job("mid", tags=["study:8"], created_at=20.0, state=JobState.SUCCEEDED),
           make_job("off", tags=["other"], created_at=5.0))
    assert store.job_ids_by_tag("study:*") == ["old", "mid", "new"]
    assert store.job_ids_by_tag("study:7") == ["old", "new"]
    assert store.job_ids_by_tag("study:*", [JobState.FAILED]) == ["old"]
    assert store.job_ids_by_tag("study:*", [JobState.QUEUED, JobState.SUCCEEDED]) == [
        "mid", "new"]
    assert store.job_ids_by_tag("nope*") == []


def test_find_job_by_spec_hash_scoped_by_owner_and_state(store: Store) -> None:
    insert(store,
           make_job("old", spec_hash="h", created_at=1.0, state=JobState.SUCCEEDED),
           make_job("new", spec_hash="h", created_at=2.0, state=JobState.RUNNING),
           make_job("failed", spec_hash="h", created_at=3.0, state=JobState.FAILED),
           make_job("bobs", spec_hash="h", owner="bob", created_at=4.0))
    good = [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]
    assert store.find_job_by_spec_hash("h", "alice", good) == "new"
    assert store.find_job_by_spec_hash("h", "alice", [JobState.SUCCEEDED]) == "old"
    assert store.find_job_by_spec_hash("h", "bob", good) == "bobs"
    assert store.find_job_by_spec_hash("h", "carol", good) is None
    assert store.find_job_by_spec_hash("other", "alice", good) is None


# -- events, outputs, attempts ------------------------------------------------------------

def test_events_are_ordered_per_job_and_resumable(store: Store) -> None:
    insert(store, make_job("j1"), make_job("j2"))
    store.apply(Changes(events=[
        NewEvent("j1", "step_started", 5.0, "s0", {"attempt": 1}),
        NewEvent("j2", "step_started", 5.0, "s0"),
        NewEvent("j1", "step_succeeded", 4.0, "s0", {"attempt": 1, "outputs": 2}),
    ]))
    events = store.events("j1")
    assert [e.kind for e in events] == ["submitted", "step_started", "step_succeeded"]
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert len({e.seq for e in events}) == 3
    assert events[0].step_id is None and events[0].data == {}
    assert events[1].step_id == "s0" and events[1].data == {"attempt": 1}
    assert events[2].at == 4.0   # order is append order, not timestamp order
    after = store.events("j1", after_seq=events[1].seq)
    assert [e.kind for e in after] == ["step_succeeded"]
    assert store.events("j1", after_seq=events[-1].seq) == []
    assert [e.kind for e in store.events("j2")] == ["submitted", "step_started"]
    assert store.events("unknown") == []


def test_outputs_ordered_by_step_then_name_and_replaced(store: Store) -> None:
    insert(store, make_job("j1", steps=2))
    store.apply(Changes(outputs=[
        OutputRow("j1", "s1", "a.txt", "/x/s1/a.txt", 1, "d1"),
        OutputRow("j1", "s0", "z.txt", "/x/s0/z.txt", 2, "d2"),
        OutputRow("j1", "s0", "b/c.txt", "/x/s0/b/c.txt", 3, "d3"),
    ]))
    assert [(o.step_id, o.name) for o in store.outputs("j1")] == [
        ("s0", "b/c.txt"), ("s0", "z.txt"), ("s1", "a.txt")]
    store.apply(Changes(outputs=[OutputRow("j1", "s0", "z.txt", "/y/z.txt", 9, "d9")]))
    outputs = store.outputs("j1")
    assert len(outputs) == 3
    assert OutputRow("j1", "s0", "z.txt", "/y/z.txt", 9, "d9") in outputs
    assert store.outputs("other") == []


def test_attempts_inserted_then_replaced_as_a_whole(store: Store) -> None:
    insert(store, make_job("j1", steps=2))
    store.apply(Changes(attempts=[AttemptRow("j1", "s0", 1, "running", 10.0, memory_mb=100)]))
    store.apply(Changes(attempts=[
        AttemptRow("j1", "s0", 1, "retry", 10.0, 11.0, 3, "exit code 3", 77, 100),
        AttemptRow("j1", "s0", 2, "succeeded", 12.0, 13.0, 0, None, 78, 100),
        AttemptRow("j1", "s1", 1, "running", 14.0),
    ]))
    attempts = store.attempts("j1")
    assert [(a.step_id, a.attempt, a.state) for a in attempts] == [
        ("s0", 1, "retry"), ("s0", 2, "succeeded"), ("s1", 1, "running")]
    assert attempts[0] == AttemptRow("j1", "s0", 1, "retry", 10.0, 11.0, 3, "exit code 3",
                                     77, 100)
    assert store.attempts("other") == []


def test_request_cancel_only_active_jobs_and_only_once(store: Store) -> None:
    insert(store, make_job("q"), make_job("r", state=JobState.RUNNING),
           make_job("done", state=JobState.SUCCEEDED))
    assert store.request_cancel("q", 50.0) is True
    assert store.request_cancel("q", 51.0) is False
    assert store.request_cancel("r", 52.0) is True
    assert store.request_cancel("done", 53.0) is False
    assert store.request_cancel("missing", 54.0) is False
    job = store.get_job("q", with_steps=False)
    assert job is not None and job.cancel_requested and job.updated_at == 50.0
    done = store.get_job("done", with_steps=False)
    assert done is not None and not done.cancel_requested
    assert [e.kind for e in store.events("q")].count("cancel_requested") == 1
    assert "cancel_requested" not in [e.kind for e in store.events("done")]
    assert sorted(store.jobs_with_cancel_requested()) == ["q", "r"]
    store.apply(Changes(jobs=[JobUpdate("q", {"state": JobState.CANCELLED, "finished_at": 60.0},
                                        JobState.QUEUED)]))
    assert store.jobs_with_cancel_requested() == ["r"]


# -- the worker's queries -----------------------------------------------------------------

def test_job_ids_in_states_oldest_first(store: Store) -> None:
    insert(store,
           make_job("new", created_at=3000.0),
           make_job("old", created_at=1000.0, state=JobState.RUNNING),
           make_job("done", created_at=2000.0, state=JobState.SUCCEEDED))
    assert store.job_ids_in_states([JobState.QUEUED, JobState.RUNNING]) == ["old", "new"]
    assert store.job_ids_in_states([JobState.SUCCEEDED]) == ["done"]
    assert store.job_ids_in_states([]) == []


def test_steps_in_states_priority_then_seq(store: Store) -> None:
    insert(store, make_job("low", steps=2, priority=0))
    insert(store, make_job("high", steps=1, priority=5, step_state=StepState.RUNNING))
    insert(store, make_job("later", steps=1, priority=0, step_state=StepState.SUCCEEDED))
    both = store.steps_in_states([StepState.QUEUED, StepState.RUNNING])
    assert [(s.job_id, s.step_id) for s in both] == [("high", "s0"), ("low", "s0"),
                                                     ("low", "s1")]
    assert [s.job_id for s in store.steps_in_states([StepState.SUCCEEDED])] == ["later"]
    assert store.steps_in_states([StepState.FAILED]) == []


def test_ready_steps_priority_seq_not_before_and_limit(store: Store) -> None:
    insert(store, make_job("first", steps=2, priority=0))
    insert(store, make_job("urgent", steps=1, priority=9))
    insert(store, make_job("pending", steps=1, step_state=StepState.PENDING, priority=99))
    insert(store, make_job("backoff", steps=1, priority=10))
    store.apply(Changes(steps=[StepUpdate("backoff", "s0", {"not_before": 200.0},
                                          StepState.QUEUED)]))
    keys = [(s.job_id, s.step_id) for s in store.ready_steps(now=100.0, limit=10)]
    assert keys == [("urgent", "s0"), ("first", "s0"), ("first", "s1")]
    keys = [(s.job_id, s.step_id) for s in store.ready_steps(now=200.0, limit=10)]
    assert keys == [("backoff", "s0"), ("urgent", "s0"), ("first", "s0"), ("first", "s1")]
    assert len(store.ready_steps(now=200.0, limit=2)) == 2
    backoff = store.ready_steps(now=300.0, limit=1)[0]
    assert backoff.not_before == 200.0


def test_ready_steps_can_leave_out_runners(store: Store) -> None:
    throttled = make_job("throttled", steps=3)
    other = make_job("other", steps=1)
    other.steps[0].runner = "free"
    insert(store, throttled, other)
    assert [s.runner for s in store.ready_steps(100.0, 2)] == ["r", "r"]
    kept = store.ready_steps(100.0, 2, exclude_runners={"r"})
    assert [(s.job_id, s.runner) for s in kept] == [("other", "free")]
    assert store.ready_steps(100.0, 10, exclude_runners=["r", "free"]) == []
    assert len(store.ready_steps(100.0, 10, exclude_runners=[])) == 4


def test_queue_depth_counts_queued_steps_by_runner_and_owner(store: Store) -> None:
    a = make_job("a", owner="alice", steps=2)
    b = make_job("b", owner="bob", steps=1)
    b.steps[0].runner = "other"
    c = make_job("c", owner="alice", steps=1, step_state=StepState.RUNNING)
    insert(store, a, b, c)
    assert store.queue_depth() == [("other", "bob", 1), ("r", "alice", 2)]


def test_apply_updates_steps_jobs_and_everything_together(store: Store) -> None:
    insert(store, make_job("j1", steps=2))
    store.apply(Changes(
        steps=[StepUpdate("j1", "s0", {"state": StepState.RUNNING, "attempt": 1, "pid": 99,
                                       "started_at": 10.0}, StepState.QUEUED)],
        jobs=[JobUpdate("j1", {"state": JobState.RUNNING, "updated_at": 10.0},
                        JobState.QUEUED)],
        attempts=[AttemptRow("j1", "s0", 1, "running", 10.0)],
        events=[NewEvent("j1", "step_started", 10.0, "s0", {"attempt": 1})]))
    job = store.get_job("j1")
    assert job is not None and job.state == JobState.RUNNING and job.updated_at == 10.0
    step = job.steps[0]
    assert (step.state, step.attempt, step.pid, step.started_at) == (
        StepState.RUNNING, 1, 99, 10.0)
    assert job.steps[1].state == StepState.QUEUED
    # an update without ``expect`` applies whatever the state
    store.apply(Changes(steps=[StepUpdate("j1", "s1", {"error": "note", "exit_code": 4})]))
    job = store.get_job("j1")
    assert job is not None and (job.steps[1].error, job.steps[1].exit_code) == ("note", 4)
    store.apply(Changes())   # an empty change set is a no-op


def test_apply_conflict_rolls_back_the_whole_change_set(store: Store) -> None:
    insert(store, make_job("j1", steps=2))
    before_events = store.events("j1")
    with pytest.raises(ConflictError):
        store.apply(Changes(
            steps=[StepUpdate("j1", "s0", {"state": StepState.RUNNING, "attempt": 1},
                              StepState.QUEUED),
                   StepUpdate("j1", "s1", {"state": StepState.SUCCEEDED},
                              StepState.RUNNING)],      # s1 is queued: conflict
            jobs=[JobUpdate("j1", {"state": JobState.RUNNING}, JobState.QUEUED)],
            attempts=[AttemptRow("j1", "s0", 1, "running", 10.0)],
            events=[NewEvent("j1", "step_started", 10.0, "s0")],
            outputs=[OutputRow("j1", "s0", "x", "/x", 1, "d")]))
    job = store.get_job("j1")
    assert job is not None and job.state == JobState.QUEUED
    assert [(s.state, s.attempt) for s in job.steps] == [(StepState.QUEUED, 0)] * 2
    assert store.attempts("j1") == [] and store.outputs("j1") == []
    assert store.events("j1") == before_events
    # the store is still usable after a rolled back transaction
    store.apply(Changes(steps=[StepUpdate("j1", "s0", {"attempt": 5}, StepState.QUEUED)]))
    job = store.get_job("j1")
    assert job is not None and job.steps[0].attempt == 5


def test_apply_conflict_on_job_expect_and_missing_rows(store: Store) -> None:
    insert(store, make_job("j1"))
    with pytest.raises(ConflictError):
        store.apply(Changes(
            steps=[StepUpdate("j1", "s0", {"attempt": 1}, StepState.QUEUED)],
            jobs=[JobUpdate("j1", {"state": JobState.SUCCEEDED}, JobState.RUNNING)]))
    job = store.get_job("j1")
    assert job is not None and job.steps[0].attempt == 0 and job.state == JobState.QUEUED
    with pytest.raises(ConflictError):
        store.apply(Changes(steps=[StepUpdate("j1", "nope", {"attempt": 1})]))
    with pytest.raises(ConflictError):
        store.apply(Changes(jobs=[JobUpdate("nope", {"error": "x"})]))


def test_apply_refuses_unknown_columns_without_writing(store: Store) -> None:
    insert(store, make_job("j1"))
    with pytest.raises(ValueError):
        store.apply(Changes(
            steps=[StepUpdate("j1", "s0", {"attempt": 3})],
            jobs=[JobUpdate("j1", {"label": "renamed"})]))
    job = store.get_job("j1")
    assert job is not None and job.label == "demo" and job.steps[0].attempt == 0


def test_concurrent_claims_with_expect_let_exactly_one_win(open_store: StoreFactory) -> None:
    first = open_store()
    insert(first, make_job("j1"))
    stores = [first, open_store(), open_store(), open_store()]
    results: list[str] = []
    barrier = threading.Barrier(len(stores))

    def claim(store: Store, n: int) -> None:
        barrier.wait()
        try:
            store.apply(Changes(
                steps=[StepUpdate("j1", "s0", {"state": StepState.RUNNING, "pid": n},
                                  StepState.QUEUED)],
                events=[NewEvent("j1", "step_started", 1.0, "s0", {"by": n})]))
            results.append("won")
        except ConflictError:
            results.append("lost")

    threads = [threading.Thread(target=claim, args=(s, n)) for n, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == ["lost", "lost", "lost", "won"]
    assert [e.kind for e in first.events("j1")].count("step_started") == 1


# -- the scheduler lock -------------------------------------------------------------------

def test_lock_acquire_refuse_reenter_and_release(store: Store) -> None:
    assert store.lock_info() is None
    assert store.try_acquire_lock(lock("A"), now=100.0, ttl=10.0) is True
    info = store.lock_info()
    assert info is not None
    assert (info.token, info.pid, info.hostname, info.started_at, info.heartbeat_at) == (
        "A", 4242, "host-a", 100.0, 100.0)
    assert store.try_acquire_lock(lock("B", 105.0, pid=1), now=105.0, ttl=10.0) is False
    assert store.lock_info() == info
    # the holder may re-acquire (refreshing its heartbeat)
    assert store.try_acquire_lock(lock("A"), now=106.0, ttl=10.0) is True
    assert store.lock_info().heartbeat_at == 106.0  # type: ignore[union-attr]
    store.release_lock("B")        # not the holder: nothing happens
    assert store.lock_info() is not None
    store.release_lock("A")
    assert store.lock_info() is None
    assert store.try_acquire_lock(lock("B", 107.0), now=107.0, ttl=10.0) is True


def test_lock_expired_ttl_is_taken_over_and_old_heartbeat_fails(store: Store) -> None:
    assert store.try_acquire_lock(lock("A"), now=100.0, ttl=10.0)
    assert store.heartbeat("A", 105.0) is True
    assert store.lock_info().heartbeat_at == 105.0  # type: ignore[union-attr]
    # 14 s after the last heartbeat, within ttl: refused
    assert store.try_acquire_lock(lock("B", 114.0), now=114.0, ttl=10.0) is False
    # past ttl: taken over
    assert store.try_acquire_lock(lock("B", 116.0, pid=7), now=116.0, ttl=10.0) is True
    info = store.lock_info()
    assert info is not None and (info.token, info.pid, info.heartbeat_at) == ("B", 7, 116.0)
    assert store.heartbeat("A", 117.0) is False     # the old holder learns it lost the lock
    store.release_lock("A")                         # and cannot release the new one's lock
    assert store.lock_info() is not None
    assert store.heartbeat("B", 118.0) is True


def test_lock_steal_token_takes_over_a_fresh_lock_only_with_the_right_token(store: Store) -> None:
    assert store.try_acquire_lock(lock("A"), now=100.0, ttl=10.0)
    assert store.try_acquire_lock(lock("B"), now=101.0, ttl=10.0, steal_token="wrong") is False
    assert store.try_acquire_lock(lock("B"), now=101.0, ttl=10.0, steal_token="A") is True
    assert store.lock_info().token == "B"  # type: ignore[union-attr]
    # a stale steal token (A was already replaced) does not take the lock from B
    assert store.try_acquire_lock(lock("C"), now=102.0, ttl=10.0, steal_token="A") is False
    assert store.heartbeat("A", 103.0) is False
    assert store.lock_info().token == "B"  # type: ignore[union-attr]


def test_concurrent_lock_acquisition_has_one_winner(open_store: StoreFactory) -> None:
    stores = [open_store() for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    won: list[str] = []

    def acquire(store: Store, token: str) -> None:
        barrier.wait()
        if store.try_acquire_lock(lock(token), now=100.0, ttl=10.0):
            won.append(token)

    threads = [threading.Thread(target=acquire, args=(s, f"T{i}")) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(won) == 1
    assert stores[0].lock_info().token == won[0]  # type: ignore[union-attr]


def test_fenced_apply_commits_only_while_the_token_holds_the_lock(store: Store) -> None:
    insert(store, make_job("j1"))
    before_events = store.events("j1")

    def claim() -> Changes:
        return Changes(
            steps=[StepUpdate("j1", "s0", {"state": StepState.RUNNING, "attempt": 1},
                              StepState.QUEUED)],
            jobs=[JobUpdate("j1", {"state": JobState.RUNNING}, JobState.QUEUED)],
            attempts=[AttemptRow("j1", "s0", 1, "running", 10.0)],
            events=[NewEvent("j1", "step_started", 10.0, "s0")],
            outputs=[OutputRow("j1", "s0", "x", "/x", 1, "d")])

    def assert_nothing_written() -> None:
        job = store.get_job("j1")
        assert job is not None and job.state == JobState.QUEUED
        assert [(s.state, s.attempt) for s in job.steps] == [(StepState.QUEUED, 0)]
        assert store.attempts("j1") == [] and store.outputs("j1") == []
        assert store.events("j1") == before_events

    with pytest.raises(LockLostError):                 # nobody holds the lock
        store.apply(claim(), fence="A")
    assert_nothing_written()
    assert store.try_acquire_lock(lock("A"), now=100.0, ttl=10.0)
    with pytest.raises(LockLostError):                 # another token holds it
        store.apply(claim(), fence="B")
    assert_nothing_written()
    assert store.try_acquire_lock(lock("B"), now=101.0, ttl=10.0, steal_token="A")
    with pytest.raises(ConflictError):                 # A was replaced: a lost lock is a conflict
        store.apply(claim(), fence="A")
    assert_nothing_written()

    store.apply(claim(), fence="B")                    # the holder's fenced write commits
    job = store.get_job("j1")
    assert job is not None and job.state == JobState.RUNNING
    assert [o.name for o in store.outputs("j1")] == ["x"]
    store.release_lock("B")
    with pytest.raises(LockLostError):                 # released: B cannot write either
        store.apply(Changes(jobs=[JobUpdate("j1", {"error": "late"})]), fence="B")
    assert store.get_job("j1").error is None  # type: ignore[union-attr]
    store.apply(Changes(jobs=[JobUpdate("j1", {"error": "unfenced"})]))   # no fence: applies
    assert store.get_job("j1").error == "unfenced"  # type: ignore[union-attr]


# -- scheduler: fair queue, step cache, cooldowns, file-hash memo, garbage collection ---------

def test_queued_owners_and_ready_steps_of_one_owner(store: Store) -> None:
    insert(store, make_job("a1", owner="alice", steps=2), make_job("b1", owner="bob"),
           make_job("c1", owner="carol", step_state=StepState.PENDING))
    assert store.queued_owners() == ["alice", "bob"]
    assert [s.job_id for s in store.ready_steps(100.0, 10, owner="bob")] == ["b1"]
    assert len(store.ready_steps(100.0, 10, owner="alice")) == 2
    assert store.ready_steps(100.0, 10, owner="carol") == []
    assert store.ready_steps(100.0, 10, exclude_runners={"r"}, owner="alice") == []


def test_gpus_step_key_and_cache_namespace_round_trip(store: Store) -> None:
    job = make_job("g")
    job.steps[0].cache_ns = "imaging"
    insert(store, job)
    step = store.get_job("g").steps[0]  # type: ignore[union-attr]
    assert (step.gpus, step.step_key, step.cache_ns) == (None, None, "imaging")
    store.apply(Changes(steps=[StepUpdate("g", "s0", {
        "state": StepState.RUNNING, "gpus": ["0", "3"], "step_key": "v1:abc"},
        StepState.QUEUED)]))
    step = store.get_job("g").steps[0]  # type: ignore[union-attr]
    assert (step.gpus, step.step_key) == (["0", "3"], "v1:abc")
    store.apply(Changes(steps=[StepUpdate("g", "s0", {"gpus": None})]))
    assert store.get_job("g").steps[0].gpus is None  # type: ignore[union-attr]


def test_find_cache_twin_by_key_namespace_and_state(store: Store) -> None:
    jobs = [make_job(j) for j in ("old", "new", "other_ns", "running")]
    for job in jobs:
        job.steps[0].cache_ns = "other" if job.job_id == "other_ns" else "lab"
    insert(store, *jobs)
    for job_id, state, finished in (("old", StepState.SUCCEEDED, 10.0),
                                    ("new", StepState.CACHED, 20.0),
                                    ("other_ns", StepState.SUCCEEDED, 30.0),
                                    ("running", StepState.RUNNING, None)):
        store.apply(Changes(steps=[StepUpdate(job_id, "s0", {
            "state": state, "step_key": "v1:k", "finished_at": finished,
            "started_at": 5.0})]))
    done = store.find_cache_twins([("v1:k", "lab"), ("v1:k", "other")],
                                  [StepState.SUCCEEDED, StepState.CACHED])
    assert {pair: step.job_id for pair, step in done.items()} == {
        ("v1:k", "lab"): "new",                       # the most recently submitted
        ("v1:k", "other"): "other_ns"}
    running = store.find_cache_twins([("v1:k", "lab")], [StepState.RUNNING])
    assert [step.job_id for step in running.values()] == ["running"]
    assert store.find_cache_twins([("v1:k", "nowhere"), ("v1:other", "lab")],
                                  [StepState.SUCCEEDED]) == {}
    many = [(f"v1:{i}", "lab") for i in range(450)] + [("v1:k", "lab")]   # several chunks
    assert list(store.find_cache_twins(many, [StepState.CACHED])) == [("v1:k", "lab")]


def test_cooldowns_are_written_with_changes_and_replaced_per_group(store: Store) -> None:
    insert(store, make_job("j"))
    first = CooldownRow("gpu-heavy", "OOM", 1.0, 2.0, 3.0, 1, "j", "s0")
    store.apply(Changes(cooldowns=[first]))
    assert store.cooldowns() == [first]
    again = CooldownRow("gpu-heavy", "OOM again", 5.0, 6.0, 7.0, 2)
    other = CooldownRow("cpu", "OOM", 1.0, 2.0, 3.0, 1)
    store.apply(Changes(cooldowns=[again, other]))
    assert store.cooldowns() == [other, again]          # ordered by group name


def test_a_fenced_cooldown_is_not_written_without_the_lock(store: Store) -> None:
    assert store.try_acquire_lock(lock("t1"), 100.0, 15.0)
    with pytest.raises(LockLostError):
        store.apply(Changes(cooldowns=[CooldownRow("g", "OOM", 1.0, 2.0, 3.0, 1)]),
                    fence="not-the-holder")
    assert store.cooldowns() == []


def test_file_hash_memo_record_lookup_replace_and_forget(store: Store) -> None:
    rows = [FileHash("/cell/artifacts/j1/s/attempt-1/output/a", 3, 10, 7, "d1"),
            FileHash("/cell/artifacts/j1/s/attempt-1/output/b", 4, 11, 8, "d2"),
            FileHash("/cell/artifacts/j10/s/attempt-1/output/a", 5, 12, 9, "d3")]
    store.record_file_hashes(rows)
    store.record_file_hashes([])
    assert store.file_hash(rows[0].path) == rows[0]
    newer = FileHash(rows[0].path, 30, 100, 70, "d9")
    store.record_file_hashes([newer])
    assert store.file_hash(rows[0].path) == newer
    store.forget_file_hashes("/cell/artifacts/j1/")
    assert store.file_hash(rows[0].path) is None and store.file_hash(rows[1].path) is None
    assert store.file_hash(rows[2].path) == rows[2]     # j10 is not under j1/


def test_terminal_jobs_before_and_delete_jobs_spare_live_work(store: Store) -> None:
    insert(store, make_job("done_old"), make_job("done_new"), make_job("live"))
    for job_id, finished in (("done_old", 10.0), ("done_new", 50.0)):
        store.apply(Changes(jobs=[JobUpdate(job_id, {"state": JobState.SUCCEEDED,
                                                     "finished_at": finished})]))
    store.apply(Changes(
        attempts=[AttemptRow("done_old", "s0", 1, "succeeded", 1.0, 2.0, 0)],
        outputs=[OutputRow("done_old", "s0", "x", "/p/x", 1, "d")],
        events=[NewEvent("done_old", "step_succeeded", 2.0, "s0")]))
    assert store.terminal_jobs_before(20.0, 10) == ["done_old"]
    assert store.terminal_jobs_before(100.0, 10) == ["done_old", "done_new"]
    assert store.terminal_jobs_before(100.0, 1) == ["done_old"]
    assert store.delete_jobs(["done_old", "live", "missing"]) == 1
    assert store.get_job("done_old") is None
    assert store.events("done_old") == [] and store.outputs("done_old") == []
    assert store.attempts("done_old") == []
    assert store.get_job("live") is not None and store.get_job("done_new") is not None


# -- persistence --------------------------------------------------------------------------

def test_schema_version_is_recorded(store: Store) -> None:
    version = store.schema_version()
    assert isinstance(version, int) and version >= 1


def test_reopening_keeps_data_and_schema(open_store: StoreFactory) -> None:
    first = open_store()
    insert(first, make_job("j1", tags=["t"]))
    first.apply(Changes(outputs=[OutputRow("j1", "s0", "o", "/o", 1, "d")]))
    version = first.schema_version()
    first.close()
    again = open_store()
    assert again.schema_version() == version
    job = again.get_job("j1")
    assert job is not None and job.tags == ["t"] and len(job.steps) == 1
    assert [o.name for o in again.outputs("j1")] == ["o"]
    insert(again, make_job("j2"))
    assert again.count_jobs() == 2


def test_two_instances_see_each_others_writes(open_store: StoreFactory) -> None:
    one, two = open_store(), open_store()
    insert(one, make_job("j1"))
    assert two.get_job("j1") is not None
    two.apply(Changes(steps=[StepUpdate("j1", "s0", {"state": StepState.RUNNING},
                                        StepState.QUEUED)]))
    assert one.get_job("j1").steps[0].state == StepState.RUNNING  # type: ignore[union-attr]
    assert two.request_cancel("j1", 5.0)
    assert one.jobs_with_cancel_requested() == ["j1"]
    assert one.try_acquire_lock(lock("A"), now=100.0, ttl=10.0)
    assert two.lock_info().token == "A"  # type: ignore[union-attr]
    assert two.try_acquire_lock(lock("B"), now=101.0, ttl=10.0) is False
