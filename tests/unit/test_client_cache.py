"""The client-side execution cache: keys, storages, chained write-back, and the cache-mode
matrix (each mode x succeeded/failed/pending entry) against a fake backend."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobcell.client import (
    CacheConfigurationChained,
    CacheConfigurationShelve,
    CacheConfigurationSQLite,
    CacheMode,
    SubmissionsDisabled,
    TaskFailed,
    scoped_config,
)
from jobcell.client import cache as client_cache
from jobcell.client.backends import (
    ExecutionRequest,
    ExecutionResult,
    ExecutionStatus,
    TaskDefinition,
)
from jobcell.client.cache import CacheEntry, cache_key, decide, new_entry
from jobcell.client.callbacks import EVENTS
from jobcell.client.task import TaskFunction, execute


class FakeBackend:
    """Executions in memory; each starts ``queued`` and finishes as the test says."""

    poll_interval_s = 0.001
    max_poll_interval_s = 0.001
    identity = "fake:1"

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.submitted: list[ExecutionRequest] = []
        self.fresh: list[bool] = []
        self.outcome = ("succeeded", "out")
        self.polls_until_done = 2
        self._ids = itertools.count(1)
        self.initialized = False

    async def initialize(self) -> bool:
        first, self.initialized = not self.initialized, True
        return first

    async def ensure_task(self, definition: TaskDefinition) -> None:
        pass

    def add(self, state: str, output: Any = None, polls: int = 0) -> str:
        job_id = f"job-{next(self._ids)}"
        self.jobs[job_id] = {"state": state, "output": output, "polls": polls,
                             "final": self.outcome}
        return job_id

    async def submit(self, request: ExecutionRequest, *, fresh: bool) -> tuple[str, bool]:
        self.submitted.append(request)
        self.fresh.append(fresh)
        return self.add("queued", polls=self.polls_until_done), False

    async def status(self, execution_id: str) -> ExecutionStatus | None:
        job = self.jobs.get(execution_id)
        if job is None:
            return None
        if job["state"] == "queued":
            if job["polls"] <= 0:
                job["state"], job["output"] = job["final"]
            job["polls"] -= 1
        return ExecutionStatus(execution_id, job["state"], {"polls": job["polls"]})

    async def result(self, execution_id: str) -> ExecutionResult:
        job = self.jobs[execution_id]
        if job["state"] == "succeeded":
            return ExecutionResult(execution_id, "succeeded", job["output"])
        return ExecutionResult(execution_id, job["state"], None, "it broke", ["last line"])

    async def cancel(self, execution_id: str) -> None:
        self.jobs[execution_id]["state"] = "cancelled"


DEFINITION = TaskDefinition(name="echo", version="1.0")
INPUT = {"x": 1}
KEY = cache_key("echo", "1.0", INPUT)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Any]:
    """A scope with a fake backend, a SQLite cache and an event log."""
    backend = FakeBackend()
    events: list[str] = []
    with scoped_config() as config:
        config.backend = backend
        config.cache = CacheConfigurationSQLite(file=tmp_path / "cache.sqlite")
        for event in EVENTS:
            getattr(config, f"on_{event}")(lambda _arg, event=event: events.append(event))
        config.events, config.fake = events, backend
        yield config
        for event in EVENTS:
            getattr(config, f"on_{event}").clear()
    client_cache.close_all()


def run(config: Any, task_input: dict[str, Any] | None = None) -> Any:
    return asyncio.run(execute(DEFINITION, "tests", task_input or INPUT, config))


def without_progress(events: list[str]) -> list[str]:
    return [e for e in events if e != "progress"]


# -- keys and entries


def test_key_has_name_version_and_input_hash() -> None:
    assert cache_key("echo", "1.0", {"a": 1, "b": [1, 2]}) == \
        cache_key("echo", "1.0", {"b": [1, 2], "a": 1})
    assert cache_key("echo", "1.0", {"a": 1}) != cache_key("echo", "1.1", {"a": 1})
    assert cache_key("echo", "1.0", {"a": 1}) != cache_key("echo", "1.0", {"a": 2})
    assert cache_key("echo", "1.0", {"a": 1}) != cache_key("other", "1.0", {"a": 1})
    assert KEY.startswith("echo@1.0:")


def test_provisioning_is_not_in_the_key(env: Any) -> None:
    with scoped_config(vcpu=2, memory_gb=1):
        assert run(current(env)) == "out"
    with scoped_config(vcpu=16, memory_gb=64, timeout_hours=3):
        assert run(current(env)) == "out"
    assert len(env.fake.submitted) == 1
    assert env.fake.submitted[0].provisioning == {"vcpu": 2.0, "memory_mb": 1024}


def current(env: Any) -> Any:
    from jobcell.client import current_config

    return current_config()


def test_entry_round_trip_and_unreadable_data() -> None:
    entry = new_entry("j1", "running", "local:/x", "echo", "1.0")
    assert entry.state == "pending"
    assert CacheEntry.from_json(entry.to_json()) == entry
    assert CacheEntry.from_json("not json") is None
    assert CacheEntry.from_json('{"unknown": 1}') is None
    assert new_entry("j", "cancelled", "b", "t", "v").state == "failed"


@pytest.mark.parametrize("kind", ["sqlite", "shelve"])
def test_storages(tmp_path: Path, kind: str) -> None:
    config = (CacheConfigurationSQLite(file=tmp_path / "c.sqlite") if kind == "sqlite"
              else CacheConfigurationShelve(file=tmp_path / "c.shelve"))
    storage = config.storage()
    assert storage is config.storage()        # one open storage per file and process
    assert storage.get("k") is None
    entry = new_entry("j1", "succeeded", "b", "t", "1")
    storage.put("k", entry)
    assert storage.get("k") == entry
    storage.delete("k")
    assert storage.get("k") is None
    client_cache.close_all()


def test_chained_writes_back_to_the_first(tmp_path: Path) -> None:
    first = CacheConfigurationSQLite(file=tmp_path / "new.sqlite")
    second = CacheConfigurationShelve(file=tmp_path / "old.shelve")
    entry = new_entry("j1", "succeeded", "b", "t", "1")
    second.storage().put("k", entry)
    chained = CacheConfigurationChained([first, second]).storage()
    assert first.storage().get("k") is None
    assert chained.get("k") == entry
    assert first.storage().get("k") == entry          # written back
    chained.put("k2", entry)
    assert first.storage().get("k2") == entry and second.storage().get("k2") is None
    assert chained.get("missing") is None
    client_cache.close_all()


# -- the mode matrix

MATRIX = {
    # mode: (succeeded, failed, pending) decisions
    CacheMode.FULLY_CACHED: ("use", "use", "reattach"),
    CacheMode.RESTART_FAILED: ("use", "ignore", "reattach"),
    CacheMode.REATTACH_ONLY: ("ignore", "ignore", "reattach"),
    CacheMode.WRITE_ONLY: ("ignore", "ignore", "ignore"),
    CacheMode.DISABLED: ("off", "off", "off"),
}


@pytest.mark.parametrize("mode", list(CacheMode))
def test_decide(mode: CacheMode) -> None:
    decisions = tuple(decide(mode, new_entry("j", state, "b", "t", "1"))
                      for state in ("succeeded", "failed", "running"))
    assert decisions == MATRIX[mode]
    assert decide(mode, None) == ("off" if mode is CacheMode.DISABLED else "miss")


@pytest.mark.parametrize("mode", list(CacheMode))
@pytest.mark.parametrize("state", ["succeeded", "failed", "pending"])
def test_mode_matrix_end_to_end(env: Any, mode: CacheMode, state: str) -> None:
    fake = env.fake
    if state == "pending":
        old = fake.add("queued", polls=1)
        fake.jobs[old]["final"] = ("succeeded", "from the old run")
    else:
        old = fake.add(state, "from the old run")
    storage = env.cache.storage()
    storage.put(KEY, new_entry(old, "running" if state == "pending" else state,
                               fake.identity, "echo", "1.0"))
    env.cache.mode = mode
    fake.outcome = ("succeeded", "new")
    decision = MATRIX[mode][("succeeded", "failed", "pending").index(state)]
    if decision == "use" and state == "failed":
        with pytest.raises(TaskFailed) as caught:
            run(env)
        assert caught.value.error == "it broke" and caught.value.log_tail == ["last line"]
        assert caught.value.execution_id == old
    else:
        value = run(env)
        assert value == ("from the old run" if decision in ("use", "reattach") else "new")
    submitted = len(fake.submitted)
    assert submitted == (0 if decision in ("use", "reattach") else 1)
    if submitted:
        assert fake.fresh == [mode is not CacheMode.FULLY_CACHED
                              and mode is not CacheMode.RESTART_FAILED]
    entry = storage.get(KEY)
    assert entry is not None
    if mode is CacheMode.DISABLED:
        assert entry.execution_id == old          # never written
        assert not any(e.startswith("cache_") for e in env.events)
    elif submitted:
        assert (entry.execution_id, entry.state) == (fake.submitted[0].execution_id,
                                                     "succeeded")
        assert "cache_ignored" in env.events
    else:
        assert entry.execution_id == old and entry.state != "pending"


def test_fresh_hit_and_reattach_event_order(env: Any) -> None:
    assert run(env) == "out"
    assert without_progress(env.events) == [
        "backend_initialized", "creating", "cache_miss", "submitted", "cache_write",
        "finished", "cache_write"]
    assert "progress" in env.events
    env.events.clear()
    assert run(env) == "out"
    assert env.events == ["creating", "cache_hit"]
    env.events.clear()
    pending = env.fake.add("queued", polls=1)
    env.cache.storage().put(KEY, new_entry(pending, "queued", env.fake.identity, "echo",
                                           "1.0"))
    assert run(env) == "out"
    assert without_progress(env.events) == ["creating", "reattached", "finished",
                                            "cache_write"]


def test_vanished_or_foreign_entries_are_misses(env: Any) -> None:
    storage = env.cache.storage()
    storage.put(KEY, new_entry("job-gone", "succeeded", env.fake.identity, "echo", "1.0"))
    assert run(env) == "out"
    assert without_progress(env.events)[:3] == ["backend_initialized", "creating",
                                                "cache_miss"]
    storage.put(KEY, new_entry("job-1", "succeeded", "other:backend", "echo", "1.0"))
    env.events.clear()
    assert run(env) == "out"
    assert without_progress(env.events)[:2] == ["creating", "cache_miss"]
    assert len(env.fake.submitted) == 2


def test_disable_submissions_serves_cache_or_refuses(env: Any) -> None:
    assert run(env) == "out"
    env.throttling.disable_submissions = True
    assert run(env) == "out"
    with pytest.raises(SubmissionsDisabled, match="in no cache"):
        run(env, {"x": 2})
    pending = env.fake.add("queued", polls=1)
    env.cache.storage().put(cache_key("echo", "1.0", {"x": 3}),
                            new_entry(pending, "queued", env.fake.identity, "echo", "1.0"))
    assert run(env, {"x": 3}) == "out"           # re-attach is allowed
    assert len(env.fake.submitted) == 1


def test_interrupt_while_waiting_detaches(env: Any) -> None:
    env.fake.polls_until_done = 10**9

    async def main() -> None:
        waiting = asyncio.ensure_future(execute(DEFINITION, "tests", INPUT, env))
        while "submitted" not in env.events:
            await asyncio.sleep(0.001)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(main())
    assert env.events[-1] == "interrupt_waiting"
    entry = env.cache.storage().get(KEY)
    assert entry is not None and entry.state == "pending"
    job = env.fake.jobs[entry.execution_id]
    assert job["state"] == "queued"                 # not cancelled: it goes on
    job["polls"] = 0
    env.events.clear()
    assert run(env) == "out"
    assert without_progress(env.events)[:2] == ["creating", "reattached"]
    assert len(env.fake.submitted) == 1


def test_raising_callbacks_do_not_break_the_task(env: Any) -> None:
    for event in EVENTS:
        getattr(env, f"on_{event}")(lambda _arg: 1 / 0)
    assert run(env) == "out"
    assert run(env) == "out"


def test_task_client_validates_with_a_schema(env: Any) -> None:
    client = TaskFunction(TaskDefinition("echo", "1.0", params={"x": {"type": "integer"}}),
                          "tests", None)
    with pytest.raises(TypeError, match="expected integer"):
        client(x="one")
    assert asyncio.run(client(x=1)) == "out"


@pytest.mark.parametrize("mode", [CacheMode.FULLY_CACHED, CacheMode.RESTART_FAILED,
                                  CacheMode.REATTACH_ONLY])
@pytest.mark.parametrize("now", ["succeeded", "failed"])
def test_pending_entry_that_finished_while_detached(env: Any, mode: CacheMode,
                                                   now: str) -> None:
    """The entry says pending; the backend says the execution has finished since. A
    success is the work every re-attaching mode came for; a failure is restarted by the
    modes that do not use failed entries."""
    fake = env.fake
    old = fake.add(now, "from the old run")
    env.cache.storage().put(KEY, new_entry(old, "running", fake.identity, "echo", "1.0"))
    env.cache.mode = mode
    fake.outcome = ("succeeded", "new")
    restart = now == "failed" and mode is not CacheMode.FULLY_CACHED
    if now == "failed" and not restart:
        with pytest.raises(TaskFailed):
            run(env)
    else:
        assert run(env) == ("new" if restart else "from the old run")
    assert len(fake.submitted) == (1 if restart else 0)
