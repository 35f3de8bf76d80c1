"""Admission: never over-commit capacity, GPUs or a group's limits (with hypothesis)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from jobcell.scheduler.admission import (
    Decision,
    GroupLimit,
    Lease,
    Request,
    admit,
    group_cap,
    never_fits_reason,
)
from jobcell.scheduler.capacity import Capacity, GpuDevice

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
    """A request left waiting really could not start now: its group is full, or it does
    not fit beside the reservation of the first request that was blocked for room.
    ``held`` are the leases *before* this decision (admitted requests are added here)."""
    free_cpu = capacity.cpu_slots - sum(x.cpu_slots for x in held)
    free_memory = capacity.memory_mb - sum(x.memory_mb for x in held)
    running = Counter(x.group for x in held)
    admitted = set(decision.admit)
    impossible = {key for key, _ in decision.never_fits}
    reserved: Request | None = None
    for r in queue:
        if r.key in impossible:
            continue
        group_full = r.max_concurrent is not None and running[r.group] >= r.max_concurrent
        room_cpu = free_cpu - (reserved.cpu_slots if reserved else 0)
        room_memory = free_memory - (reserved.memory_mb if reserved else 0)
        fits = ((r.cpu_slots == 0 or r.cpu_slots <= room_cpu)
                and (r.memory_mb == 0 or r.memory_mb <= room_memory))
        if r.key in admitted:
            free_cpu -= r.cpu_slots
            free_memory -= r.memory_mb
            running[r.group] += 1
            continue
        assert group_full or not fits, r
        if not group_full and reserved is None:
            reserved = r


# --- examples ----------------------------------------------------------------------------


def test_admits_in_queue_order_until_full() -> None:
    decision = admit(Capacity(2, 1000), [], [request("a"), request("b"), request("c")])
    assert decision == Decision(("a", "b"), ())


def test_existing_leases_count() -> None:
    decision = admit(Capacity(4, 1000), [lease("x", cpu=3)], [request("a"), request("b")])
    assert decision.admit == ("a",)


def test_memory_limits_too() -> None:
    decision = admit(Capacity(8, 1000), [lease("x", memory=600)],
                     [request("a", memory=300), request("b", memory=300)])
    assert decision.admit == ("a",)


def test_a_blocked_request_reserves_what_it_waits_for() -> None:
    # "big" cannot start yet; the small one behind it would take the memory it waits
    # for, so it waits too (no starvation of big steps by a stream of small ones).
    decision = admit(Capacity(8, 1000), [lease("x", memory=700)],
                     [request("big", memory=400), request("small", memory=300)])
    assert decision.admit == ()


def test_requests_that_fit_beside_the_reservation_still_start() -> None:
    decision = admit(Capacity(4, 1000), [lease("x", cpu=2, memory=100)],
                     [request("big", cpu=3, memory=100), request("no-cpu", cpu=0, memory=100),
                      request("one-cpu", cpu=1, memory=100)])
    assert decision.admit == ("no-cpu",)


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


# --- GPU devices -------------------------------------------------------------------------


def with_gpus(count: int, cpu: int = 8, memory: int = 8000) -> Capacity:
    """A capacity with ``count`` GPUs indexed "0", "1", ..."""
    return Capacity(cpu, memory, gpus=tuple(GpuDevice(str(i), 16_000, "test GPU")
                                            for i in range(count)))


def gpu_request(key: str, gpus: int = 1, optional_gpus: int = 0, group: str = "g"
                ) -> Request:
    return Request(key, 1, 100, group, gpus=gpus, optional_gpus=optional_gpus)


def test_each_gpu_request_gets_its_own_device_until_none_is_free() -> None:
    queue = [gpu_request("a"), gpu_request("b"), gpu_request("c")]
    decision = admit(with_gpus(2), [], queue)
    assert decision.admit == ("a", "b"), "the third request waits for a device"
    assert decision.devices == {"a": ("0",), "b": ("1",)}
    assert decision.never_fits == ()


def test_devices_held_by_running_steps_are_not_handed_out() -> None:
    running = [Lease("x", 1, 100, "g", ("0",))]
    decision = admit(with_gpus(2), running, [gpu_request("a"), gpu_request("b")])
    assert decision.admit == ("a",)
    assert decision.devices == {"a": ("1",)}


def test_a_lease_on_a_device_the_cell_no_longer_has_frees_nothing() -> None:
    running = [Lease("x", 1, 100, "g", ("7",))]
    decision = admit(with_gpus(1), running, [gpu_request("a"), gpu_request("b")])
    assert decision.devices == {"a": ("0",)}


def test_optional_gpus_are_taken_when_free_but_never_block() -> None:
    both_held = [Lease("x", 1, 100, "g", ("0", "1"))]
    decision = admit(with_gpus(2), both_held, [gpu_request("a", gpus=0, optional_gpus=2)])
    assert decision.admit == ("a",)
    assert decision.devices == {}, "no free device: it starts without one"
    one_held = [Lease("x", 1, 100, "g", ("0",))]
    decision = admit(with_gpus(2), one_held, [gpu_request("a", gpus=0, optional_gpus=2)])
    assert decision.devices == {"a": ("1",)}


def test_optional_gpus_on_a_cell_without_gpus() -> None:
    decision = admit(with_gpus(0), [], [gpu_request("a", gpus=0, optional_gpus=3)])
    assert decision == Decision(("a",), ())


def test_required_and_optional_gpus_add_up() -> None:
    queue = [gpu_request("a", gpus=1, optional_gpus=1), gpu_request("b"), gpu_request("c")]
    decision = admit(with_gpus(3), [], queue)
    assert decision.admit == ("a", "b")
    assert decision.devices == {"a": ("0", "1"), "b": ("2",)}


def test_a_step_ahead_takes_its_optional_gpus_first() -> None:
    # Greedy in queue order: a step ahead takes its optional devices even if a
    # required request behind it then waits; the queue order is the policy.
    queue = [gpu_request("a", gpus=0, optional_gpus=2), gpu_request("b")]
    decision = admit(with_gpus(2), [], queue)
    assert decision.admit == ("a",)
    assert decision.devices == {"a": ("0", "1")}


def test_more_gpus_than_the_cell_has_never_fits() -> None:
    reason = never_fits_reason(with_gpus(2), 1, 100, gpus=3)
    assert reason is not None and "GPU" in reason and "3" in reason and "2" in reason
    assert never_fits_reason(with_gpus(2), 1, 100, gpus=2) is None



def test_more_gpus_than_this_worker_sees_waits_without_reserving() -> None:
    # Submit refuses such steps; a worker that sees fewer GPUs than the submitter did
    # must neither fail them nor let them hold back the steps behind them.
    decision = admit(with_gpus(2), [], [gpu_request("big", gpus=3), gpu_request("ok")])
    assert decision.admit == ("ok",)
    assert decision.never_fits == ()


def test_gpus_held_by_others_do_not_make_a_request_impossible() -> None:
    running = [Lease("x", 1, 100, "g", ("0", "1"))]
    decision = admit(with_gpus(2), running, [gpu_request("a", gpus=2)])
    assert decision == Decision((), ())


# --- group limits (OOM cooldowns and throttles) ------------------------------------------


def test_a_blocked_group_admits_nothing_but_other_groups_go_on() -> None:
    queue = [request("hot1", group="hot"), request("cold", group="cold"),
             request("hot2", group="hot")]
    limits = {"hot": GroupLimit(blocked=True, reason="OOM")}
    assert admit(Capacity(8, 8000), [], queue, limits).admit == ("cold",)


def test_a_blocked_group_still_reports_requests_that_never_fit() -> None:
    limits = {"hot": GroupLimit(blocked=True)}
    decision = admit(Capacity(2, 1000), [], [request("huge", cpu=3, group="hot")], limits)
    assert [key for key, _ in decision.never_fits] == ["huge"]


def test_a_throttled_group_at_its_limit_admits_none() -> None:
    queue = [request("hot1", group="hot"), request("cold", group="cold"),
             request("hot2", group="hot")]
    limits = {"hot": GroupLimit(max_concurrent=1)}
    running = [lease("x", group="hot")]
    assert admit(Capacity(8, 8000), running, queue, limits).admit == ("cold",)
    assert admit(Capacity(8, 8000), [], queue, limits).admit == ("hot1", "cold")


def test_the_tighter_of_runner_max_concurrent_and_throttle_applies() -> None:
    runner_allows_three = [request(k, group="g", max_concurrent=3) for k in "abcd"]
    throttle_two = {"g": GroupLimit(max_concurrent=2)}
    assert admit(Capacity(8, 8000), [], runner_allows_three, throttle_two).admit == ("a", "b")
    runner_allows_one = [request(k, group="g", max_concurrent=1) for k in "abcd"]
    throttle_five = {"g": GroupLimit(max_concurrent=5)}
    assert admit(Capacity(8, 8000), [], runner_allows_one, throttle_five).admit == ("a",)


def test_limits_on_other_groups_do_not_apply() -> None:
    limits = {"other": GroupLimit(blocked=True), "g": GroupLimit()}
    queue = [request("a"), request("b")]
    assert admit(Capacity(8, 8000), [], queue, limits).admit == ("a", "b")


def test_group_cap() -> None:
    assert group_cap(request("a"), None) is None
    assert group_cap(request("a"), GroupLimit()) is None
    assert group_cap(request("a", max_concurrent=3), None) == 3
    assert group_cap(request("a"), GroupLimit(max_concurrent=2)) == 2
    assert group_cap(request("a", max_concurrent=3), GroupLimit(max_concurrent=2)) == 2
    assert group_cap(request("a", max_concurrent=1), GroupLimit(max_concurrent=2)) == 1


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
    assert_within_limits(capacity, leases, queue, decision)
    assert_greedy(capacity, leases, queue, decision)


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
        before = held
        held = assert_within_limits(capacity, held, queue, decision)
        assert_greedy(capacity, before, queue, decision)
        done = set(decision.admit) | {key for key, _ in decision.never_fits}
        queue = [r for r in queue if r.key not in done]
    # Draining: once everything running completes, whatever fits alone eventually runs.
    while queue:
        held = []
        decision = admit(capacity, held, queue)
        assert decision.admit or decision.never_fits, "an idle cell must make progress"
        done = set(decision.admit) | {key for key, _ in decision.never_fits}
        queue = [r for r in queue if r.key not in done]


# --- property: GPUs and group limits through a history -----------------------------------

GPU_GROUPS = ("a", "b", "c", "d")
gpu_capacities = st.builds(
    lambda cpu, memory, count: with_gpus(count, cpu, memory),
    st.integers(0, 16), st.integers(0, 16_000), st.integers(0, 4))
group_limits_st = st.dictionaries(st.sampled_from(GPU_GROUPS), st.one_of(
    st.just(GroupLimit(blocked=True)),
    st.builds(GroupLimit, max_concurrent=st.integers(1, 3)),
    st.just(GroupLimit()),
))
# What each group's runner declares as max_concurrent (None: no limit).
runner_caps_st = st.fixed_dictionaries(
    {group: st.one_of(st.none(), st.integers(1, 3)) for group in GPU_GROUPS})
request_fields = st.tuples(st.integers(0, 20), st.integers(0, 20_000), st.integers(0, 5),
                           st.integers(0, 4), st.sampled_from(GPU_GROUPS))


def replay(capacity: Capacity, held: Sequence[Lease], queue: Sequence[Request],
           limits: dict[str, GroupLimit], decision: Decision) -> None:
    """Walk the queue in order as admission should: each request is admitted exactly
    when it can ever fit, its group is neither blocked nor at its cap, and it fits the
    resources still free at that point beyond what the first blocked request reserved,
    and then it gets the free devices it asks for."""
    admitted = set(decision.admit)
    impossible = {key for key, _ in decision.never_fits}
    free_cpu = capacity.cpu_slots - sum(x.cpu_slots for x in held)
    free_memory = capacity.memory_mb - sum(x.memory_mb for x in held)
    taken = {device for x in held for device in x.gpus}
    free_gpus = [gpu.index for gpu in capacity.gpus if gpu.index not in taken]
    running = Counter(x.group for x in held)
    reserved = (0, 0, 0)
    reserving = False
    for r in queue:
        too_big = r.cpu_slots > capacity.cpu_slots or r.memory_mb > capacity.memory_mb
        assert (r.key in impossible) == too_big, r
        limit = limits.get(r.group)
        cap = group_cap(r, limit)
        allowed = (not too_big and r.gpus <= capacity.gpu_count
                   and not (limit is not None and limit.blocked)
                   and (cap is None or running[r.group] < cap))
        fits = ((r.cpu_slots == 0 or r.cpu_slots <= free_cpu - reserved[0])
                and (r.memory_mb == 0 or r.memory_mb <= free_memory - reserved[1])
                and (r.gpus == 0 or r.gpus <= len(free_gpus) - reserved[2]))
        startable = allowed and fits
        assert (r.key in admitted) == startable, (r, free_cpu, free_memory, free_gpus)
        if allowed and not fits and not reserving:
            reserving, reserved = True, (r.cpu_slots, r.memory_mb, r.gpus)
        if not startable:
            continue
        got = decision.devices.get(r.key, ())
        assert r.gpus <= len(got) <= r.gpus + r.optional_gpus
        assert len(got) == r.gpus + max(0, min(r.optional_gpus,
                                               len(free_gpus) - reserved[2] - r.gpus)), \
            "optional GPUs"
        assert set(got) <= set(free_gpus), "only devices free at that point"
        free_gpus = [device for device in free_gpus if device not in got]
        free_cpu -= r.cpu_slots
        free_memory -= r.memory_mb
        running[r.group] += 1


def assert_gpu_invariants(capacity: Capacity, before: Sequence[Lease],
                          queue: Sequence[Request], limits: dict[str, GroupLimit],
                          decision: Decision) -> list[Lease]:
    """Capacity, devices and group limits hold; returns the leases held afterwards."""
    by_key = {r.key: r for r in queue}
    assert list(decision.admit) == [r.key for r in queue if r.key in decision.admit]
    assert set(decision.devices) <= set(decision.admit)
    added = [Lease(k, by_key[k].cpu_slots, by_key[k].memory_mb, by_key[k].group,
                   tuple(decision.devices.get(k, ()))) for k in decision.admit]
    held = [*before, *added]
    assert sum(x.cpu_slots for x in held) <= capacity.cpu_slots
    assert sum(x.memory_mb for x in held) <= capacity.memory_mb
    devices = [device for x in held for device in x.gpus]
    assert len(devices) == len(set(devices)), "a GPU device is held twice"
    assert set(devices) <= {gpu.index for gpu in capacity.gpus}
    running = Counter(x.group for x in held)
    for new in added:
        limit = limits.get(new.group)
        assert not (limit is not None and limit.blocked), "a blocked group started a step"
        cap = group_cap(by_key[new.key], limit)
        assert cap is None or running[new.group] <= cap, "a group went over its cap"
    replay(capacity, before, queue, limits, decision)
    return held


@settings(max_examples=150, deadline=None)
@given(gpu_capacities, runner_caps_st, st.data())
def test_gpus_and_group_limits_hold_through_submissions_and_completions(
        capacity: Capacity, runner_caps: dict[str, int | None], data: st.DataObject) -> None:
    queue: list[Request] = []
    held: list[Lease] = []
    submitted = 0
    for _ in range(data.draw(st.integers(0, 30), label="events")):
        if data.draw(st.booleans(), label="submit?"):
            for cpu, memory, gpus, optional, group in data.draw(
                    st.lists(request_fields, min_size=1, max_size=5), label="requests"):
                submitted += 1
                queue.append(Request(f"s{submitted}", cpu, memory, group, runner_caps[group],
                                     gpus, optional))
        elif held:
            held.pop(data.draw(st.integers(0, len(held) - 1), label="completes"))
        limits = data.draw(group_limits_st, label="limits")
        decision = admit(capacity, held, queue, limits)
        held = assert_gpu_invariants(capacity, held, queue, limits, decision)
        done = set(decision.admit) | {key for key, _ in decision.never_fits}
        queue = [r for r in queue if r.key not in done]
    # Draining with every cooldown over: an idle cell always makes progress on what it
    # can run (steps needing more GPUs than it sees wait, and hold nothing back).
    queue = [r for r in queue if r.gpus <= capacity.gpu_count]
    while queue:
        decision = admit(capacity, [], queue)
        assert_gpu_invariants(capacity, [], queue, {}, decision)
        assert decision.admit or decision.never_fits, "an idle cell must make progress"
        done = set(decision.admit) | {key for key, _ in decision.never_fits}
        queue = [r for r in queue if r.key not in done]
