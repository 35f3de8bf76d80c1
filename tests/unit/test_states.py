"""Job and step state machines, and the job state implied by its steps."""

from __future__ import annotations

import itertools

import pytest

from jobcell.model.states import (
    TERMINAL_JOB_STATES,
    TERMINAL_STEP_STATES,
    JobState,
    StepState,
    TransitionError,
    check_job_transition,
    check_step_transition,
    job_state_from_steps,
    job_transition_allowed,
    step_transition_allowed,
)

J = JobState
S = StepState

JOB_ALLOWED = {
    (J.QUEUED, J.RUNNING), (J.QUEUED, J.SUCCEEDED), (J.QUEUED, J.FAILED),
    (J.QUEUED, J.CANCELLED), (J.RUNNING, J.SUCCEEDED), (J.RUNNING, J.FAILED),
    (J.RUNNING, J.CANCELLED),
}
STEP_ALLOWED = {
    (S.PENDING, S.QUEUED), (S.PENDING, S.CANCELLED),
    (S.QUEUED, S.RUNNING), (S.QUEUED, S.CACHED), (S.QUEUED, S.WAITING_CACHE),
    (S.QUEUED, S.CANCELLED), (S.QUEUED, S.FAILED),
    (S.RUNNING, S.SUCCEEDED), (S.RUNNING, S.FAILED), (S.RUNNING, S.CANCELLED),
    (S.RUNNING, S.QUEUED),
    (S.WAITING_CACHE, S.CACHED), (S.WAITING_CACHE, S.QUEUED), (S.WAITING_CACHE, S.CANCELLED),
}


def test_state_values_are_the_documented_words() -> None:
    assert [s.value for s in JobState] == ["queued", "running", "succeeded", "failed",
                                           "cancelled"]
    assert {s.value for s in StepState} == {"pending", "queued", "running", "succeeded",
                                            "failed", "cancelled", "cached", "waiting_cache"}


@pytest.mark.parametrize(("current", "new"), list(itertools.product(JobState, JobState)))
def test_job_transitions(current: JobState, new: JobState) -> None:
    allowed = (current, new) in JOB_ALLOWED
    assert job_transition_allowed(current, new) is allowed
    if allowed:
        check_job_transition(current, new)
    else:
        with pytest.raises(TransitionError, match=f"job cannot move from {current} to {new}"):
            check_job_transition(current, new)


@pytest.mark.parametrize(("current", "new"), list(itertools.product(StepState, StepState)))
def test_step_transitions(current: StepState, new: StepState) -> None:
    allowed = (current, new) in STEP_ALLOWED
    assert step_transition_allowed(current, new) is allowed
    if allowed:
        check_step_transition(current, new)
    else:
        with pytest.raises(TransitionError, match=f"step cannot move from {current} to {new}"):
            check_step_transition(current, new)


def test_terminal_states_have_no_exits() -> None:
    for job_state, new_job in itertools.product(TERMINAL_JOB_STATES, JobState):
        assert not job_transition_allowed(job_state, new_job)
    for step_state, new_step in itertools.product(TERMINAL_STEP_STATES, StepState):
        assert not step_transition_allowed(step_state, new_step)
    assert {S.SUCCEEDED, S.FAILED, S.CANCELLED, S.CACHED} == TERMINAL_STEP_STATES


def test_running_to_queued_is_the_retry_edge_and_nothing_else_goes_back() -> None:
    assert step_transition_allowed(S.RUNNING, S.QUEUED)
    assert not step_transition_allowed(S.RUNNING, S.PENDING)
    assert not step_transition_allowed(S.QUEUED, S.PENDING)
    assert not job_transition_allowed(J.RUNNING, J.QUEUED)


def test_no_state_moves_to_itself() -> None:
    assert not any(job_transition_allowed(s, s) for s in JobState)
    assert not any(step_transition_allowed(s, s) for s in StepState)


@pytest.mark.parametrize(("steps", "cancel", "expected"), [
    ([S.PENDING, S.PENDING], False, J.QUEUED),
    ([S.QUEUED, S.PENDING], False, J.QUEUED),
    ([S.RUNNING, S.PENDING], False, J.RUNNING),
    ([S.WAITING_CACHE, S.PENDING], False, J.RUNNING),
    ([S.SUCCEEDED, S.PENDING], False, J.RUNNING),
    ([S.CACHED, S.QUEUED], False, J.RUNNING),
    ([S.SUCCEEDED, S.SUCCEEDED], False, J.SUCCEEDED),
    ([S.CACHED, S.SUCCEEDED], False, J.SUCCEEDED),
    ([S.CACHED], False, J.SUCCEEDED),
    ([S.FAILED, S.CANCELLED], False, J.FAILED),
    ([S.SUCCEEDED, S.FAILED], False, J.FAILED),
    ([S.FAILED, S.RUNNING], False, J.RUNNING),
    ([S.CANCELLED, S.CANCELLED], False, J.CANCELLED),
    ([S.SUCCEEDED, S.CANCELLED], False, J.CANCELLED),
    ([S.SUCCEEDED, S.CANCELLED], True, J.CANCELLED),
    ([S.FAILED, S.CANCELLED], True, J.CANCELLED),
    ([S.RUNNING, S.CANCELLED], True, J.RUNNING),
    ([S.PENDING], True, J.QUEUED),
    # A cancel that arrives after all the work was done does not undo it.
    ([S.SUCCEEDED, S.SUCCEEDED], True, J.SUCCEEDED),
])
def test_job_state_from_steps(steps: list[StepState], cancel: bool, expected: JobState) -> None:
    assert job_state_from_steps(steps, cancel_requested=cancel) == expected


def test_job_state_is_terminal_exactly_when_every_step_is() -> None:
    for combo in itertools.product(StepState, repeat=2):
        for cancel in (False, True):
            state = job_state_from_steps(list(combo), cancel)
            all_terminal = all(s in TERMINAL_STEP_STATES for s in combo)
            assert (state in TERMINAL_JOB_STATES) == all_terminal, (combo, cancel, state)
