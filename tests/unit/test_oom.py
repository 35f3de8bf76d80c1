"""OOM policy: what counts as out of memory, cooldown then throttle, memory raises."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobcell.scheduler.admission import GroupLimit
from jobcell.scheduler.oom import group_limits, is_oom_like, phase, raised_memory, start_cooldown
from jobcell.store.base import CooldownRow

NOW = 1_700_000_000.0


def cooldown(group: str = "gpu", now: float = NOW, cooldown_s: float = 600.0,
             throttle_hours: float = 2.0, throttle_max: int = 1) -> CooldownRow:
    return start_cooldown(group, now, cooldown_s=cooldown_s, throttle_hours=throttle_hours,
                          throttle_max=throttle_max, reason=f"OOM in {group}")


# --- is_oom_like -------------------------------------------------------------------------


@pytest.mark.parametrize(("exit_code", "state"), [
    (137, None), (-9, None), (None, "OUT_OF_MEMORY"), (1, "OUT_OF_MEMORY"),
    (0, "OUT_OF_MEMORY"), (137, "COMPLETED"),
])
def test_oom_like_exits(exit_code: int | None, state: str | None) -> None:
    assert is_oom_like(exit_code, state)


@pytest.mark.parametrize(("exit_code", "state"), [
    (1, None), (0, None), (None, None), (143, None), (-15, None), (9, None), (128, None),
    (1, "FAILED"), (None, "out_of_memory"), (None, ""), (0, "COMPLETED"),
])
def test_other_exits_are_not_oom_like(exit_code: int | None, state: str | None) -> None:
    assert not is_oom_like(exit_code, state)


def test_the_scheduler_state_is_optional() -> None:
    assert is_oom_like(137)
    assert not is_oom_like(143)


# --- start_cooldown and phase ------------------------------------------------------------


def test_start_cooldown_sets_both_phases_from_now() -> None:
    row = start_cooldown("gpu", NOW, cooldown_s=600.0, throttle_hours=2.0, throttle_max=1,
                         reason="exit 137", job_id="j1", step_id="train")
    assert row == CooldownRow(group="gpu", reason="exit 137", started_at=NOW,
                              cooldown_until=NOW + 600.0,
                              throttle_until=NOW + 600.0 + 2 * 3600.0, throttle_max=1,
                              job_id="j1", step_id="train")


def test_start_cooldown_without_a_step() -> None:
    row = cooldown(throttle_hours=0.5, throttle_max=3)
    assert (row.job_id, row.step_id) == (None, None)
    assert row.throttle_until - row.cooldown_until == 1800.0
    assert row.throttle_max == 3


def test_phase_boundaries() -> None:
    row = cooldown(cooldown_s=600.0, throttle_hours=1.0)
    assert phase(row, NOW - 1.0) == "cooldown", "a clock that stepped back stays careful"
    assert phase(row, NOW) == "cooldown"
    assert phase(row, NOW + 599.999) == "cooldown"
    assert phase(row, NOW + 600.0) == "throttled"
    assert phase(row, NOW + 600.0 + 3599.999) == "throttled"
    assert phase(row, NOW + 600.0 + 3600.0) is None
    assert phase(row, NOW + 10 * 86400.0) is None


def test_zero_lengths_skip_their_phase() -> None:
    no_cooldown = cooldown(cooldown_s=0.0, throttle_hours=1.0)
    assert phase(no_cooldown, NOW) == "throttled"
    no_throttle = cooldown(cooldown_s=60.0, throttle_hours=0.0)
    assert phase(no_throttle, NOW + 59.0) == "cooldown"
    assert phase(no_throttle, NOW + 60.0) is None
    assert phase(cooldown(cooldown_s=0.0, throttle_hours=0.0), NOW) is None


# --- group_limits ------------------------------------------------------------------------


def test_group_limits_per_phase() -> None:
    rows = [cooldown("blocked", now=NOW), cooldown("throttled", now=NOW - 700.0, throttle_max=2),
            cooldown("over", now=NOW - 3 * 3600.0)]
    assert group_limits(rows, NOW) == {
        "blocked": GroupLimit(blocked=True, reason="OOM in blocked"),
        "throttled": GroupLimit(max_concurrent=2, reason="OOM in throttled"),
    }


def test_group_limits_follow_the_clock() -> None:
    rows = [cooldown("gpu", cooldown_s=600.0, throttle_hours=1.0, throttle_max=1)]
    assert group_limits(rows, NOW)["gpu"].blocked
    during_throttle = group_limits(rows, NOW + 600.0)["gpu"]
    assert not during_throttle.blocked and during_throttle.max_concurrent == 1
    assert group_limits(rows, NOW + 600.0 + 3600.0) == {}


def test_no_cooldowns_no_limits() -> None:
    assert group_limits([], NOW) == {}


# --- raised_memory -----------------------------------------------------------------------


def test_memory_is_raised_by_the_factor() -> None:
    assert raised_memory(1000, 1.5, 64_000) == 1500
    assert raised_memory(1000, 2.0, 64_000) == 2000
    assert raised_memory(1000, 16.0, 64_000) == 16_000


def test_raised_memory_is_capped_at_the_capacity() -> None:
    assert raised_memory(1000, 1.5, 1200) == 1200
    assert raised_memory(1000, 16.0, 4000) == 4000


def test_factor_one_leaves_memory_unchanged() -> None:
    assert raised_memory(1000, 1.0, 64_000) == 1000
    assert raised_memory(1000, 1.0, 10) == 1000


def test_raised_memory_is_never_below_the_current_request() -> None:
    assert raised_memory(1000, 1.5, 800) == 1000, "a smaller cell never shrinks a request"
    assert raised_memory(1000, 1.5, 1000) == 1000


def test_raised_memory_rounds_up() -> None:
    assert raised_memory(1001, 1.5, 64_000) == 1502
    assert raised_memory(3, 1.1, 64_000) == 4
    assert raised_memory(1, 1.01, 64_000) == 2


@pytest.mark.parametrize(("current", "factor", "expected"), [
    (100, 1.1, 110), (3000, 1.1, 3300), (700, 1.3, 910), (10, 1.7, 17),
])
def test_exact_products_are_not_rounded_up_by_float_error(
        current: int, factor: float, expected: int) -> None:
    # 100 * 1.1 == 110.00000000000001 in binary floating point.
    assert raised_memory(current, factor, 64_000) == expected


def test_zero_memory_stays_zero() -> None:
    assert raised_memory(0, 2.0, 64_000) == 0


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**7), st.floats(1.0, 16.0), st.integers(0, 10**8))
def test_raised_memory_bounds(current: int, factor: float, capacity: int) -> None:
    raised = raised_memory(current, factor, capacity)
    assert isinstance(raised, int)
    assert raised >= current
    assert raised <= max(current, capacity)
    assert raised <= max(current, current * factor + 1)
    if capacity >= current * factor + 1:
        assert raised >= current * factor - 1e-6 * max(current, 1)
