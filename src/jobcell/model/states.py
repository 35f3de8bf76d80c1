"""Job and step states, and the transitions allowed between them.

States only move forward. The one exception is a retry or a requeue after an
interrupted attempt: the step goes back from ``running`` to ``queued`` with a
new attempt number, and each attempt on its own still only moves forward.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StepState(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    CACHED = "cached"
    WAITING_CACHE = "waiting_cache"


TERMINAL_JOB_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
ACTIVE_JOB_STATES = frozenset({JobState.QUEUED, JobState.RUNNING})
TERMINAL_STEP_STATES = frozenset(
    {StepState.SUCCEEDED, StepState.FAILED, StepState.CANCELLED, StepState.CACHED}
)
DONE_STEP_STATES = frozenset({StepState.SUCCEEDED, StepState.CACHED})

_JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED,
                                JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

_STEP_TRANSITIONS: dict[StepState, frozenset[StepState]] = {
    StepState.PENDING: frozenset({StepState.QUEUED, StepState.CANCELLED}),
    StepState.QUEUED: frozenset({StepState.RUNNING, StepState.CACHED, StepState.WAITING_CACHE,
                                 StepState.CANCELLED, StepState.FAILED}),
    # running -> queued is the retry/requeue edge (a new attempt starts).
    StepState.RUNNING: frozenset({StepState.SUCCEEDED, StepState.FAILED, StepState.CANCELLED,
                                  StepState.QUEUED}),
    StepState.WAITING_CACHE: frozenset({StepState.CACHED, StepState.QUEUED,
                                        StepState.CANCELLED}),
    StepState.SUCCEEDED: frozenset(),
    StepState.FAILED: frozenset(),
    StepState.CANCELLED: frozenset(),
    StepState.CACHED: frozenset(),
}


class TransitionError(ValueError):
    """A state change that the state machine does not allow."""


def job_transition_allowed(current: JobState, new: JobState) -> bool:
    """Whether a job may move from ``current`` to ``new``."""
    return new in _JOB_TRANSITIONS[current]


def step_transition_allowed(current: StepState, new: StepState) -> bool:
    """Whether a step may move from ``current`` to ``new``."""
    return new in _STEP_TRANSITIONS[current]


def check_step_transition(current: StepState, new: StepState) -> None:
    """Raise :class:`TransitionError` unless the step transition is allowed."""
    if not step_transition_allowed(current, new):
        raise TransitionError(f"step cannot move from {current} to {new}")


def check_job_transition(current: JobState, new: JobState) -> None:
    """Raise :class:`TransitionError` unless the job transition is allowed."""
    if not job_transition_allowed(current, new):
        raise TransitionError(f"job cannot move from {current} to {new}")


def job_state_from_steps(states: list[StepState], cancel_requested: bool = False) -> JobState:
    """The job state implied by its steps' states."""
    if states and all(s in DONE_STEP_STATES for s in states):
        return JobState.SUCCEEDED  # all the work was done before a cancel could stop it
    if cancel_requested and all(s in TERMINAL_STEP_STATES for s in states):
        return JobState.CANCELLED
    if any(s == StepState.FAILED for s in states) and all(
        s in TERMINAL_STEP_STATES for s in states
    ):
        return JobState.FAILED
    if states and all(s in DONE_STEP_STATES for s in states):
        return JobState.SUCCEEDED
    if all(s in TERMINAL_STEP_STATES for s in states):
        return JobState.CANCELLED
    started = {StepState.RUNNING, StepState.WAITING_CACHE} | TERMINAL_STEP_STATES
    if any(s in started for s in states):
        return JobState.RUNNING
    return JobState.QUEUED
