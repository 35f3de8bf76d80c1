"""What happens after an attempt ends, and how a job advances. Pure functions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from jobcell.model.states import (
    DONE_STEP_STATES,
    TERMINAL_STEP_STATES,
    JobState,
    StepState,
    job_state_from_steps,
)

MAX_INTERRUPTIONS = 3
MAX_BACKOFF_S = 300.0


class Verdict(StrEnum):
    SUCCEEDED = "succeeded"
    RETRY = "retry"          # a failure with retries left: new attempt after a delay
    REQUEUE = "requeue"      # interrupted (no exit_code, nothing alive): new attempt now
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Outcome:
    """The decision about one ended attempt."""

    verdict: Verdict
    reason: str | None = None
    delay_s: float = 0.0


def retry_delay(base_s: float, failures: int) -> float:
    """Exponential backoff: base, 2*base, 4*base, ... capped."""
    return min(base_s * (2 ** max(failures - 1, 0)), MAX_BACKOFF_S)


def decide_outcome(*, exit_code: int | None, missing_outputs: Sequence[str],
                   kill_reason: str | None, cancel_requested: bool, failures: int,
                   retries: int, interruptions: int, backoff_s: float,
                   error_message: str | None = None,
                   linked_outputs: Sequence[str] = ()) -> Outcome:
    """Classify an ended attempt.

    ``exit_code`` None means interrupted. ``failures`` counts earlier failed
    attempts; ``interruptions`` counts earlier interrupted ones. A step is only
    a success with exit code 0 and every declared output present.
    """
    if exit_code == 0 and linked_outputs and kill_reason is None:
        kill_reason = ("outputs must be files the step wrote itself, not symlinks or "
                       "hard links: " + ", ".join(linked_outputs))
    if exit_code == 0 and not missing_outputs and kill_reason is None:
        # Finished work is kept, even when a cancel arrived while it was ending.
        return Outcome(Verdict.SUCCEEDED)
    if cancel_requested:
        return Outcome(Verdict.CANCELLED, "cancelled")
    if exit_code is None and kill_reason is None:
        if interruptions + 1 > MAX_INTERRUPTIONS:
            return Outcome(Verdict.FAILED, f"interrupted {interruptions + 1} times")
        return Outcome(Verdict.REQUEUE, "interrupted: no exit_code and no live process")
    reason = _failure_reason(exit_code, missing_outputs, kill_reason, error_message)
    if failures < retries:
        return Outcome(Verdict.RETRY, reason, retry_delay(backoff_s, failures + 1))
    return Outcome(Verdict.FAILED, reason)


def _failure_reason(exit_code: int | None, missing: Sequence[str], kill_reason: str | None,
                    error_message: str | None) -> str:
    if kill_reason is not None:
        return kill_reason
    if exit_code == 0:
        return "declared output(s) missing: " + ", ".join(missing)
    text = f"exit code {exit_code}"
    if exit_code in (137, -9):
        text += " (killed by signal 9, OOM-like)"
    elif exit_code is not None and exit_code > 128:
        text += f" (signal {exit_code - 128})"
    return f"{text}: {error_message}" if error_message else text


class StepView(Protocol):
    step_id: str
    state: StepState
    inputs: list[str]


@dataclass
class AdvancePlan:
    """Steps to queue, cancel or stop, and the job's resulting state."""

    queue: list[str] = field(default_factory=list)
    cancel: list[str] = field(default_factory=list)
    terminate: list[str] = field(default_factory=list)
    job_state: JobState = JobState.QUEUED


def plan_advance(steps: Sequence[StepView], cancel_requested: bool) -> AdvancePlan:
    """Idempotent: the same steps always give the same plan."""
    plan = AdvancePlan()
    states = {s.step_id: s.state for s in steps}
    stopping = cancel_requested or StepState.FAILED in states.values()
    for step in steps:
        if step.state in TERMINAL_STEP_STATES:
            continue
        if stopping:
            if step.state == StepState.RUNNING:
                plan.terminate.append(step.step_id)
            else:
                plan.cancel.append(step.step_id)
                states[step.step_id] = StepState.CANCELLED
        elif step.state == StepState.PENDING and all(
                states[i] in DONE_STEP_STATES for i in step.inputs):
            plan.queue.append(step.step_id)
            states[step.step_id] = StepState.QUEUED
    plan.job_state = job_state_from_steps(list(states.values()), cancel_requested)
    return plan
