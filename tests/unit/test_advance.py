"""What happens after an attempt ends (decide_outcome) and how a job advances."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from jobcell.model.advance import (
    MAX_BACKOFF_S,
    MAX_INTERRUPTIONS,
    AdvancePlan,
    Outcome,
    Verdict,
    decide_outcome,
    plan_advance,
    retry_delay,
)
from jobcell.model.states import JobState, StepState

S = StepState


def outcome(**overrides: Any) -> Outcome:
    """decide_outcome for a clean exit 0 with no retries, unless overridden."""
    arguments: dict[str, Any] = {
        "exit_code": 0, "missing_outputs": [], "kill_reason": None,
        "cancel_requested": False, "failures": 0, "retries": 0, "interruptions": 0,
        "backoff_s": 2.0,
    }
    arguments.update(overrides)
    return decide_outcome(**arguments)


# --- decide_outcome ----------------------------------------------------------------------


def test_exit_zero_with_outputs_present_succeeds() -> None:
    assert outcome() == Outcome(Verdict.SUCCEEDED)


def test_missing_declared_outputs_is_a_failure_even_with_exit_zero() -> None:
    result = outcome(missing_outputs=["counts.json", "b.txt"])
    assert result.verdict == Verdict.FAILED
    assert result.reason == "declared output(s) missing: counts.json, b.txt"


def test_nonzero_exit_with_retries_left_retries_with_backoff() -> None:
    first = outcome(exit_code=1, retries=3, failures=0)
    assert first.verdict == Verdict.RETRY
    assert first.reason == "exit code 1"
    assert first.delay_s == 2.0
    second = outcome(exit_code=1, retries=3, failures=1)
    assert (second.verdict, second.delay_s) == (Verdict.RETRY, 4.0)
    third = outcome(exit_code=1, retries=3, failures=2)
    assert (third.verdict, third.delay_s) == (Verdict.RETRY, 8.0)


def test_retries_exhausted_fails() -> None:
    result = outcome(exit_code=2, retries=3, failures=3)
    assert result.verdict == Verdict.FAILED
    assert result.reason == "exit code 2"
    assert result.delay_s == 0
    assert outcome(exit_code=2, retries=0).verdict == Verdict.FAILED


def test_missing_outputs_are_retried_like_any_failure() -> None:
    assert outcome(missing_outputs=["x"], retries=1).verdict == Verdict.RETRY


@pytest.mark.parametrize("code", [137, -9])
def test_sigkill_exit_is_reported_as_oom_like(code: int) -> None:
    result = outcome(exit_code=code)
    assert result.verdict == Verdict.FAILED
    assert result.reason is not None
    assert "OOM-like" in result.reason
    assert f"exit code {code}" in result.reason


def test_other_signal_exits_name_the_signal() -> None:
    assert outcome(exit_code=143).reason == "exit code 143 (signal 15)"


def test_error_message_is_appended_to_the_reason() -> None:
    assert outcome(exit_code=1, error_message="boom").reason == "exit code 1: boom"


def test_interrupted_attempts_are_requeued_then_failed() -> None:
    for earlier in range(MAX_INTERRUPTIONS):
        result = outcome(exit_code=None, interruptions=earlier)
        assert result.verdict == Verdict.REQUEUE
        assert result.delay_s == 0
    result = outcome(exit_code=None, interruptions=MAX_INTERRUPTIONS)
    assert result.verdict == Verdict.FAILED
    assert result.reason == f"interrupted {MAX_INTERRUPTIONS + 1} times"


def test_interruptions_do_not_use_up_retries() -> None:
    # An interrupted attempt is never a success and never a counted failure.
    assert outcome(exit_code=None, retries=0, failures=0).verdict == Verdict.REQUEUE


@pytest.mark.parametrize("exit_code", [None, 0, 143])
def test_timeout_kill_is_a_failure_whatever_the_exit_code(exit_code: int | None) -> None:
    result = outcome(exit_code=exit_code, kill_reason="timeout after 600 s")
    assert result.verdict == Verdict.FAILED
    assert result.reason == "timeout after 600 s"
    retry = outcome(exit_code=exit_code, kill_reason="timeout after 600 s", retries=1)
    assert retry.verdict == Verdict.RETRY


@pytest.mark.parametrize("exit_code", [None, 0, 1, 143])
def test_cancel_wins_over_everything(exit_code: int | None) -> None:
    result = outcome(exit_code=exit_code, cancel_requested=True, retries=5,
                     kill_reason="cancelled by user")
    assert result.verdict == Verdict.CANCELLED


def test_never_a_success_without_exit_zero() -> None:
    for code in (None, 1, 2, 127, 137, 143, -15):
        for retries in (0, 1):
            assert outcome(exit_code=code, retries=retries).verdict != Verdict.SUCCEEDED


def test_retry_delay_doubles_and_is_capped() -> None:
    assert [retry_delay(1.0, n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert retry_delay(1.0, 0) == 1.0
    assert retry_delay(1.0, 100) == MAX_BACKOFF_S
    assert retry_delay(0.0, 5) == 0.0


# --- plan_advance ------------------------------------------------------------------------


@dataclass
class Step:
    step_id: str
    state: StepState
    inputs: list[str] = field(default_factory=list)


def diamond(top: StepState = S.PENDING, left: StepState = S.PENDING,
            right: StepState = S.PENDING, join: StepState = S.PENDING) -> list[Step]:
    return [Step("top", top), Step("left", left, ["top"]), Step("right", right, ["top"]),
            Step("join", join, ["left", "right"])]


def apply(plan: AdvancePlan, steps: list[Step]) -> list[Step]:
    """Apply a plan the way the worker does (terminated steps end as cancelled)."""
    new_state = {**dict.fromkeys(plan.queue, S.QUEUED), **dict.fromkeys(plan.cancel,
                                                                         S.CANCELLED)}
    return [Step(s.step_id, new_state.get(s.step_id, s.state), s.inputs) for s in steps]


def test_a_new_job_queues_only_its_roots() -> None:
    plan = plan_advance(diamond(), cancel_requested=False)
    assert plan == AdvancePlan(queue=["top"], job_state=JobState.QUEUED)


def test_both_branches_queue_when_the_top_is_done() -> None:
    plan = plan_advance(diamond(top=S.SUCCEEDED), cancel_requested=False)
    assert plan.queue == ["left", "right"]
    assert plan.job_state == JobState.RUNNING


def test_join_waits_for_every_input() -> None:
    plan = plan_advance(diamond(S.SUCCEEDED, S.SUCCEEDED, S.RUNNING), cancel_requested=False)
    assert plan.queue == []
    plan = plan_advance(diamond(S.SUCCEEDED, S.CACHED, S.SUCCEEDED), cancel_requested=False)
    assert plan.queue == ["join"]


def test_all_done_is_succeeded() -> None:
    plan = plan_advance(diamond(S.SUCCEEDED, S.SUCCEEDED, S.CACHED, S.SUCCEEDED), False)
    assert plan == AdvancePlan(job_state=JobState.SUCCEEDED)


def test_a_failure_cancels_pending_and_terminates_running_siblings() -> None:
    steps = diamond(S.SUCCEEDED, S.FAILED, S.RUNNING, S.PENDING)
    plan = plan_advance(steps, cancel_requested=False)
    assert plan.queue == []
    assert plan.cancel == ["join"]
    assert plan.terminate == ["right"]
    assert plan.job_state == JobState.RUNNING
    after = apply(plan, steps)
    after[2].state = S.CANCELLED  # the terminated sibling ends
    final = plan_advance(after, cancel_requested=False)
    assert final == AdvancePlan(job_state=JobState.FAILED)


def test_queued_and_waiting_steps_are_cancelled_after_a_failure() -> None:
    steps = [Step("a", S.FAILED), Step("b", S.QUEUED), Step("c", S.WAITING_CACHE)]
    plan = plan_advance(steps, cancel_requested=False)
    assert plan.cancel == ["b", "c"]
    assert plan.job_state == JobState.FAILED


def test_cancel_request_stops_everything() -> None:
    steps = diamond(S.SUCCEEDED, S.RUNNING, S.QUEUED, S.PENDING)
    plan = plan_advance(steps, cancel_requested=True)
    assert plan.queue == []
    assert plan.cancel == ["right", "join"]
    assert plan.terminate == ["left"]
    assert plan.job_state == JobState.RUNNING
    after = apply(plan, steps)
    after[1].state = S.CANCELLED
    assert plan_advance(after, cancel_requested=True).job_state == JobState.CANCELLED


@pytest.mark.parametrize("steps", [
    diamond(),
    diamond(S.SUCCEEDED),
    diamond(S.SUCCEEDED, S.SUCCEEDED, S.SUCCEEDED),
    diamond(S.SUCCEEDED, S.FAILED, S.RUNNING),
    diamond(S.FAILED),
])
@pytest.mark.parametrize("cancel", [False, True])
def test_plan_advance_is_idempotent(steps: list[Step], cancel: bool) -> None:
    plan = plan_advance(steps, cancel)
    assert plan_advance(steps, cancel) == plan, "same steps, same plan"
    again = plan_advance(apply(plan, steps), cancel)
    assert again.queue == []
    assert again.cancel == []
    assert again.terminate == plan.terminate, "running steps are still to be stopped"


def test_plan_advance_does_not_mutate_its_input() -> None:
    steps = diamond(S.SUCCEEDED)
    plan_advance(steps, cancel_requested=False)
    assert [s.state for s in steps] == [S.SUCCEEDED, S.PENDING, S.PENDING, S.PENDING]


def test_driving_a_diamond_to_completion() -> None:
    steps = diamond()
    finished_order: list[str] = []
    for _ in range(10):
        plan = plan_advance(steps, cancel_requested=False)
        if plan.job_state == JobState.SUCCEEDED:
            break
        steps = apply(plan, steps)
        for step in steps:  # every queued step runs and succeeds
            if step.state == S.QUEUED:
                step.state = S.SUCCEEDED
                finished_order.append(step.step_id)
    assert plan.job_state == JobState.SUCCEEDED
    assert finished_order == ["top", "left", "right", "join"]


def test_finished_work_wins_over_a_racing_cancel() -> None:
    """Exit 0 with every declared output is a success even when a cancel arrived meanwhile;
    a cancel still stops a failed or unfinished attempt."""
    from jobcell.model.advance import Verdict, decide_outcome

    common = {"missing_outputs": [], "kill_reason": None, "failures": 0, "retries": 2,
              "interruptions": 0, "backoff_s": 1.0}
    assert decide_outcome(exit_code=0, cancel_requested=True, **common).verdict == \
        Verdict.SUCCEEDED
    assert decide_outcome(exit_code=1, cancel_requested=True, **common).verdict == \
        Verdict.CANCELLED
    assert decide_outcome(exit_code=None, cancel_requested=True, **common).verdict == \
        Verdict.CANCELLED
