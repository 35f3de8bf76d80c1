"""Admission: never over-commit capacity or a group's max_concurrent (with hypothesis)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from jobcell.scheduler.admission import Decision, Lease, Request, admit, never_fits_reason
from jobcell.scheduler.capacity import Capacity

GROUPS = ("a", "b", "c")
GROUP_LIMITS = {"a": 1, "b": 2, "c": None}  # one limit per group, as a runner declares it


def request(key: str, cpu: int = 1, memory: int = 100, group: str = "g",
            max_concurrent: int | None = None) -> Request:
    return Request(key, cpu, memory, group, max_concurrent)


def lease(key: str, cpu: int = 1, memory: int = 100, group: str = "g") -> Lease:
    return Lease(key, cpu, memory, group)


def assert_within_limits(capacity: Capacity, leases: Sequence[Lease],
                         queue: Sequence[Request], decision: Decision) -> list[Lease]:
    """The invariant; returns the leases held after admission."""
    by_key = {r.key: r for r in queue}
    held = [*leases, *(Lease(k, by_key[k].cpu_slots, by_key[k].memory_mb, by_key[k].group)
                       for k in decision.admit)]
    assert sum(x.cpu_slots for x in held) <= capacity.cpu_slots
    assert sum(x.memory_mb for x in held) <= capacity.memory_mb
    running = Counter(x.group for x in held)
    for key in decision.admit:
        limit = by_key[key].max_concurrent
        if limit is not None:
            assert running[by_key[key].group] <= limit
    assert len(set(decision.admit)) == len(decision.admit)
    impossible = {key for key, _ in decision.never_fits}
    assert not impossible & set(decision.admit)
    for r in queue:
        too_big = r.cpu_slots > capacity.cpu_slots or r.memory_mb > capacity.memory_mb
        assert (r.key in impossible) == too_big
    return held


def assert_greedy(capacity: Capacity, held: Sequence[Lease], queue: Sequence[Request],
                  decision: Decision) -> None:
    """A request left waiting really could not start now (no idle capacity is wasted)."""
    free_cpu = capacity.cpu_slots - sum(x.cpu_slots for x in held)
    free_memory = capacity.memory_mb - sum(x.memory_mb for x in held)
    running = Counter(x.group for x in held)
    skipped = set(decision.admit) | {key for key, _ in decision.never_fits}
    for r in queue:
        if r.key in skipped:
            continue
        group_full = r.max_concurrent is not None and running[r.group] >= r.max_concurrent
        assert group_full or r.cpu_slots > free_cpu or r.memory_mb > free_memory, r


# --- examples ----------------------------------------------------------------------------


def test_admits_in_queue_order_until_full() -> None:
    decision = admit(Capacity(2, 1000), [], [request("a"), request("b"), request("c")])
    assert decision == Decision(("a", "b"), ())


def test_existing_leases_count() -> None:
    decision = admit(Capacity(4, 1000), [lease("x", cpu=3)], [request("a"), request("b")])
    assert decision.admit == ("a",)


def test_memory_limits_too() -> None:
    decision = admit(Capacity(8, 1000), [lease("x", memory=700)],
                     [request("a", memory=400), request("b", memory=300)])
    assert decision.admit == ("b",), "a big request is skipped, a smaller one behind it runs"


def test_group_max_concurrent() -> None:
    queue = [request(k, group="gpu", max_concurrent=2) for k in "abc"]
    assert admit(Capacity(8, 8000), [], queue).admit == ("a", "b")
    running = [lease("x", group="gpu")]
    assert admit(Capacity(8, 8000), running, queue).admit == ("a",)


def test_requests_larger_than_the_cell_never_fit() -> None:
    queue = [request("cpu", cpu=5), request("mem", memory=5000), request("ok")]
    decision = admit(Capacity(4, 4000), [], queue)
    assert decision.admit == ("ok",)
    assert decision.never_fits == (
        ("cpu", "needs 5 cpu slots but the cell has 4"),
        ("mem", "needs 5000 MB of memory but the cell has 4000 MB"),
    )


def test_never_fits_reason() -> None:
    assert never_fits_reason(Capacity(2, 100), 2, 100) is None
    assert never_fits_reason(Capacity(2, 100), 3, 1) is not None
    assert never_fits_reason(Capacity(2, 100), 1, 101) is not None


def test_zero_resource_requests_still_respect_group_limits() -> None:
    queue = [request(k, cpu=0, memory=0, group="g", max_concurrent=1) for k in "ab"]
    assert admit(Capacity(0, 0), [], queue).admit == ("a",)


# --- properties --------------------------------------------------------------------------

capacities = st.builds(Capacity, st.integers(0, 16), st.integers(0, 16_000))


def requests_for(prefix: str, max_size: int = 25) -> st.SearchStrategy[list[Request]]:
    def build(index: int, cpu: int, memory: int, group: str) -> Request:
        return Request(f"{prefix}{index}", cpu, memory, group, GROUP_LIMITS[group])

    one = st.tuples(st.integers(0, 20), st.integers(0, 20_000), st.sampled_from(GROUPS))
    return st.lists(one, max_size=max_size).map(
        lambda items: [build(i, *item) for i, item in enumerate(items)])


@st.composite
def fitting_leases(draw: st.DrawFn, capacity: Capacity) -> list[Lease]:
    """Leases that already fit the capacity and the group limits."""
    leases: list[Lease] = []
    cpu, memory = capacity.cpu_slots, capacity.memory_mb
    running: Counter[str] = Counter()
    for index in range(draw(st.integers(0, 8))):
        group = draw(st.sampled_from(GROUPS))
        limit = GROUP_LIMITS[group]
        if limit is not None and running[group] >= limit:
            continue
        need_cpu = draw(st.integers(0, cpu))
        need_memory = draw(st.integers(0, memory))
        leases.append(Lease(f"lease{index}", need_cpu, need_memory, group))
        cpu, memory = cpu - need_cpu, memory - need_memory
        running[group] += 1
    return leases


@st.composite
def situations(draw: st.DrawFn) -> tuple[Capacity, list[Lease], list[Request]]:
    capacity = draw(capacities)
    return capacity, draw(fitting_leases(capacity)), draw(requests_for("q"))


@settings(max_examples=300, deadline=None)
@given(situations())
def test_admission_never_over_commits(
        situation: tuple[Capacity, list[Lease], list[Request]]) -> None:
    capacity, leases, queue = situation
    decision = admit(capacity, leases, queue)
    held = assert_within_limits(capacity, leases, queue, decision)
    assert_greedy(capacity, held, queue, decision)


@st.composite
def histories(draw: st.DrawFn) -> tuple[Capacity, list[tuple[str, int]]]:
    """A capacity and a sequence of ("submit", batch size) / ("complete", which) events."""
    capacity = draw(capacities)
    events = draw(st.lists(st.one_of(
        st.tuples(st.just("submit"), st.integers(1, 5)),
        st.tuples(st.just("complete"), st.integers(0, 1_000)),
    ), max_size=40))
    return capacity, events


@settings(max_examples=100, deadline=None)
@given(histories(), st.data())
def test_invariant_holds_through_submissions_and_completions(
        history: tuple[Capacity, list[tuple[str, int]]], data: st.DataObject) -> None:
    capacity, events = history
    queue: list[Request] = []
    held: list[Lease] = []
    submitted = 0
    for kind, amount in events:
        if kind == "submit":
            for r in data.draw(requests_for("tmp", max_size=amount)):
                submitted += 1
                queue.append(Request(f"s{submitted}", r.cpu_slots, r.memory_mb, r.group,
                                     r.max_concurrent))
        elif held:
            held.pop(amount % len(held))
        decision = admit(capacity, held, queue)
        held = assert_within_limits(capacity, held, queue, decision)
        assert_greedy(capacity, held, queue, decision)
        done = set(decision.admit) | {key for key, _ in decision.never_fits}
        queue = [r for r in queue if r.key not in done]
    # Draining: once everything running completes, whatever fits alone eventually runs.
    while queue:
        held = []
        decision = admit(capacity, held, queue)
        assert decision.admit or decision.never_fits, "an idle cell must make progress"
        done = set(decision.admit) | {key for key, _ in decision.never_fits}
        queue = [r for r in queue if r.key not in done]
