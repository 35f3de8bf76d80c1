"""The worker loop: heartbeat, leadership, recovery, poll, commit, advance, admit.

The worker is the only writer of step transitions. Every round it

1. notes jobs whose cancellation was requested,
2. polls every running attempt in one call and commits their outcomes
   (completion is committed in its own transaction, before anything advances),
3. advances the touched jobs (idempotent: a crash before this step is finished
   by the next worker, which advances every active job on start),
4. stops attempts past their timeout,
5. settles steps that wait for an identical running step (step cache),
6. admits queued steps in fair order: a cache hit is copied, a step whose twin is
   running waits for it, the rest start when they fit the capacity. The attempt is
   committed as running *before* it is spawned, so a crash in between is an
   interrupted attempt (requeued), never a lost or doubled one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from jobcell import artifacts, wakeup
from jobcell.errors import JobcellError
from jobcell.executors.base import Executor, Launch, Phase, Status
from jobcell.executors.container import ContainerOptions
from jobcell.executors.delegated import read_record
from jobcell.executors.embedded import EmbeddedExecutor, install_wrapper
from jobcell.executors.select import backend_of, make_executor
from jobcell.home import CellHome, open_home
from jobcell.launching import build_launch
from jobcell.leadership import WorkerAlreadyRunning, lock_is_stale
from jobcell.model.advance import Outcome, Verdict, decide_outcome, plan_advance
from jobcell.model.runner import (
    RunnerDefinition,
)
from jobcell.model.states import ACTIVE_JOB_STATES, TERMINAL_JOB_STATES, JobState, StepState
from jobcell.scheduler import oom
from jobcell.scheduler.admission import GroupLimit, Lease, Request, admit
from jobcell.scheduler.capacity import Capacity, detect_capacity
from jobcell.scheduler.fairness import Queued, fair_order
from jobcell.settings import Settings, load_settings
from jobcell.stepcache import StepCache, clear_cache_leftover
from jobcell.store import (
    AttemptRow,
    Changes,
    ConflictError,
    CooldownRow,
    LockInfo,
    LockLostError,
    NewEvent,
    OutputRow,
    StepRow,
    Store,
)
from jobcell.store.base import JobUpdate, StepUpdate
from jobcell.store.sqlite import SQLiteStore

ADMIT_BATCH = 1000
UNBOUNDED = 1 << 40   # the capacity of a delegated backend: it queues steps itself
WAITING_RECHECK_S = 10.0  # re-check cache waiters this often even when nothing ended


def step_key(job_id: str, step_id: str) -> str:
    """The executor key of a step's current attempt."""
    return f"{job_id}/{step_id}"


def _fault(point: str) -> None:
    """Crash here when the test-only fault injection variable names this point."""
    if os.environ.get("JOBCELL_FAULT_INJECT") == point:
        os._exit(70)


@dataclass
class _Kill:
    reason: str
    force_at: float
    stop: bool            # True: stopped because the job is stopping (cancel or failed sibling)
    forced: bool = False


class Worker:
    """Serves one cell: the single scheduler of its steps."""

    def __init__(self, home: CellHome, settings: Settings, store: Store, *,
                 executor: Executor | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.home = home
        self.settings = settings
        self.store = store
        self.clock = clock
        self.capacity: Capacity = detect_capacity(
            settings.cpu_slots, settings.node_memory_mb, settings.memory_reserve_mb,
            settings.gpu_count)
        # One executor per backend in use; the embedded one always exists.
        self.executors: dict[str, Executor] = {
            "embedded": executor or EmbeddedExecutor(home.wrapper_script)}
        self._backend_of: dict[str, str] = {}      # executor key -> backend name
        self._backend_errors: dict[str, str] = {}  # executor key -> last backend_error noted
        self.cache = StepCache(home, store)
        self.token = uuid.uuid4().hex
        self._running: dict[str, StepRow] = {}
        self._kills: dict[str, _Kill] = {}
        self._cancelling: set[str] = set()
        self._touched: set[str] = set()
        self._runner_cache: dict[str, RunnerDefinition] = {}
        # runner name -> (concurrency group, its max_concurrent), as last seen
        self._runner_groups: dict[str, tuple[str, int | None]] = {}
        self._stop = False
        self._last_heartbeat = 0.0
        self._idle_since: float | None = None
        self._cooldowns: dict[str, CooldownRow] = {}
        self._waiting_checked = float("-inf")   # when cache waiters were last settled
        self._last_gc = clock()
        self._wake_fd: int | None = None
        self._last_served: dict[str, int] = {}   # owner -> turn it was last served
        self._turn = 0

    # -- leadership
    def acquire(self) -> None:
        """Take the scheduler lock, or raise :class:`WorkerAlreadyRunning`."""
        now = self.clock()
        ttl = self.settings.worker_heartbeat_ttl_s
        current = self.store.lock_info()
        steal = current.token if current and lock_is_stale(current, now, ttl) else None
        info = LockInfo(self.token, os.getpid(), socket.gethostname(), now, now)
        if not self.store.try_acquire_lock(info, now, ttl, steal_token=steal):
            holder = self.store.lock_info()
            raise WorkerAlreadyRunning(holder or info)
        self._last_heartbeat = now
        install_wrapper(self.home.wrapper_script)
        if self._wake_fd is None:
            self._wake_fd = wakeup.open_listener(self.home.wake_pipe)

    def _heartbeat(self, now: float) -> bool:
        if now - self._last_heartbeat < self.settings.worker_heartbeat_ttl_s / 5:
            return True
        self._last_heartbeat = now
        return self.store.heartbeat(self.token, now)

    def _commit(self, changes: Changes) -> None:
        """Every write of the worker is fenced by its lock token."""
        self.store.apply(changes, fence=self.token)

    def release(self) -> None:
        """Give up the scheduler lock (running attempts go on and are re-adopted later)."""
        self.store.release_lock(self.token)

    def request_stop(self, *_: Any) -> None:
        """Finish the current round, then stop (signal handler); wakes a waiting worker."""
        self._stop = True
        if self._wake_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake_fd, b"!")

    # -- lifecycle
    @property
    def executor(self) -> Executor:
        """The embedded executor (local processes)."""
        return self.executors["embedded"]

    def _executor(self, backend: str) -> Executor:
        """The executor of ``backend``, made on first use (ConfigError when it cannot be)."""
        executor = self.executors.get(backend)
        if executor is None:
            executor = make_executor(backend, self.home, self.settings)
            self.executors[backend] = executor
        return executor

    def _executor_for(self, key: str) -> Executor:
        return self.executors.get(self._backend_of.get(key, "embedded"), self.executor)

    def recover(self) -> None:
        """Re-adopt running attempts, re-advance every active job, re-read cooldowns and
        settle cache waiters."""
        self._cooldowns = {row.group: row for row in self.store.cooldowns()}
        self._waiting_checked = float("-inf")
        for step in self.store.steps_in_states([StepState.RUNNING]):
            key = step_key(step.job_id, step.step_id)
            self._running[key] = step
            attempt_dir = self.home.attempt_dir(step.job_id, step.step_id, step.attempt)
            backend = step.backend or "embedded"
            backend_id = step.backend_id or (str(step.pid) if step.pid is not None else None)
            try:
                executor = self._executor(backend)
            except JobcellError as exc:
                # Its backend is no longer configured: the attempt cannot be followed.
                print(f"cannot follow {key} on {backend}: {exc}", file=sys.stderr)
                self._kills[key] = _Kill(f"cannot follow it on {backend}: {exc}",
                                         float("inf"), stop=False, forced=True)
                backend, executor = "embedded", self.executor
            self._backend_of[key] = backend
            executor.adopt(key, attempt_dir, backend_id)
            if backend_id is None and executor.delegated:
                self._recover_backend_id(step, attempt_dir)
        self._touched.update(self.store.job_ids_in_states(ACTIVE_JOB_STATES))

    def _recover_backend_id(self, step: StepRow, attempt_dir: Path) -> None:
        """A worker died between submitting and recording the backend id: the executor
        wrote it to ``external_backend.json`` first; the database learns it now."""
        record = read_record(attempt_dir)
        if record is None:
            return  # not known yet: the executor finds the job by name; noted at its end
        step.backend_id = record.backend_id
        self._record_submissions({step_key(step.job_id, step.step_id): record.backend_id},
                                 self.clock())

    def _resync(self) -> None:
        """Forget what this worker believed and rebuild it from the store."""
        self._running.clear()
        self._kills.clear()
        self._touched.clear()
        self._cancelling.clear()
        self._backend_of.clear()
        # Fresh ones: the old ones tracked attempts by what this worker believed.
        for executor in self.executors.values():
            executor.close()
        self.executors = {"embedded": EmbeddedExecutor(self.home.wrapper_script)}
        self.recover()

    def run(self, until_idle: bool = False) -> None:
        """Serve the cell until stopped, idle for ``worker_idle_exit_s``, or (``until_idle``)
        until no job is active."""
        self.acquire()
        try:
            self.recover()
            self._serve(until_idle)
        finally:
            with contextlib.suppress(Exception):
                self.release()
            for executor in self.executors.values():
                with contextlib.suppress(Exception):
                    executor.close()
            if self._wake_fd is not None:
                os.close(self._wake_fd)
                self._wake_fd = None

    def _serve(self, until_idle: bool) -> None:
        while not self._stop:
            if not self._heartbeat(self.clock()):
                print("lost the scheduler lock; stopping", file=sys.stderr)
                return
            try:
                did = self.run_once()
            except LockLostError:
                print("another worker took over the scheduler lock; stopping", file=sys.stderr)
                return
            except ConflictError as exc:
                print(f"the cell's state changed under this worker ({exc}); re-reading it",
                      file=sys.stderr)
                self._resync()
                continue
            if self._should_exit(did, until_idle):
                if self._leave_if_still_idle():
                    return
            elif not did:
                wake = () if self._wake_fd is None else (self._wake_fd,)
                self.executor.wait(self.settings.poll_interval_s, wake)
                if self._wake_fd is not None:
                    wakeup.drain(self._wake_fd)

    def _leave_if_still_idle(self) -> bool:
        """Release the lock; stay on if a job arrived meanwhile.

        A submitter that saw this worker alive did not start another one, so a job
        that arrived between the idle check and the release must still be served.
        """
        self.release()
        if self.store.count_jobs(states=ACTIVE_JOB_STATES) == 0:
            return True
        try:
            self.acquire()
        except WorkerAlreadyRunning:
            return True  # another worker serves the new job
        self._idle_since = None
        return False

    def _should_exit(self, did: bool, until_idle: bool) -> bool:
        if did or self._running:
            self._idle_since = None
            return False
        if self.store.count_jobs(states=ACTIVE_JOB_STATES) > 0:
            self._idle_since = None
            return False
        if until_idle:
            return True
        now = self.clock()
        self._idle_since = self._idle_since or now
        limit = self.settings.worker_idle_exit_s
        return bool(limit) and now - self._idle_since >= limit

    def run_once(self) -> bool:
        """One round; returns whether anything changed."""
        now = self.clock()
        did = self._note_cancels()
        did = self._collect(now) or did
        did = self._settle_waiting(now) or did
        did = self._advance(now) or did
        self._enforce_timeouts(now)
        did = self._admit(now) or did
        self._maybe_collect_garbage(now)
        return did

    # -- cancellation
    def _note_cancels(self) -> bool:
        new = set(self.store.jobs_with_cancel_requested()) - self._cancelling
        self._cancelling |= new
        self._touched |= new
        return bool(new)

    # -- collect ended attempts
    def _collect(self, now: float) -> bool:
        ended: list[str] = []
        changes = Changes()
        statuses: dict[str, Status] = {}
        for name, executor in list(self.executors.items()):
            try:
                polled = executor.poll()
            except Exception as exc:  # a backend's surprise must not stop the worker
                print(f"polling {name} failed ({type(exc).__name__}: {exc}); its steps stay "
                      "running", file=sys.stderr)
                continue
            # Each step's word comes from the executor that runs it.
            statuses.update((key, status) for key, status in polled.items()
                            if self._backend_of.get(key, "embedded") == name)
        self._note_backend_errors(statuses, now)
        for key, status in statuses.items():
            if status.phase in (Phase.RUNNING, Phase.UNKNOWN) or key not in self._running:
                continue
            step = self._running[key]
            self._record_end(changes, step, status, now)
            ended.append(key)
        if not ended:
            return False
        self._commit(changes)
        _fault("after_completion_commit")
        self._cooldowns.update((row.group, row) for row in changes.cooldowns)
        self.cache.memo.flush()
        for key in ended:
            self._executor_for(key).forget(key)
            self._backend_of.pop(key, None)
            self._backend_errors.pop(key, None)
            step = self._running.pop(key)
            self._kills.pop(key, None)
            self._touched.add(step.job_id)
            if step.step_key is not None:
                self._waiting_checked = float("-inf")  # its cache waiters can settle now
        return True

    def _note_backend_errors(self, statuses: Mapping[str, Status], now: float) -> None:
        """A backend answering nonsense about a step (an external status command printing
        something unparsable) leaves it running; the message goes into its events once."""
        changes = Changes()
        for key, status in statuses.items():
            step = self._running.get(key)
            if status.phase != Phase.UNKNOWN or step is None:
                continue
            last_error = getattr(self._executor_for(key), "last_error", None)
            message = last_error(key) if last_error is not None else None
            if message is None or self._backend_errors.get(key) == message:
                continue
            self._backend_errors[key] = message
            changes.events.append(NewEvent(step.job_id, "backend_error", now, step.step_id,
                                           {"backend": step.backend, "message": message}))
        if changes:
            self._commit(changes)

    def _record_end(self, changes: Changes, step: StepRow, status: Status, now: float) -> None:
        key = step_key(step.job_id, step.step_id)
        paths = artifacts.AttemptPaths(self.home.attempt_dir(step.job_id, step.step_id,
                                                             step.attempt))
        if step.backend_id is None and step.backend not in (None, "embedded"):
            record = read_record(paths.root)   # found by the executor after a crash
            if record is not None:
                step.backend_id = record.backend_id
                changes.steps.append(StepUpdate(step.job_id, step.step_id,
                                                {"backend_id": record.backend_id}))
        kill = self._kills.get(key)
        code = status.exit_code if status.phase in (Phase.EXITED, Phase.FAILED) else None
        oom_like = kill is None and (status.oom_like or oom.is_oom_like(code))
        if kill is None and status.phase == Phase.FAILED:
            # The backend ended it without an exit code (Slurm TIMEOUT, CANCELLED, ...).
            kill = _Kill(status.reason or "the backend ended it", float("inf"), stop=False,
                         forced=True)
        outcome, outputs = self._judge(step, paths, code, kill)
        self._write_outcome(changes, step, outcome, code, outputs, now)
        if oom_like and outcome.verdict in (Verdict.RETRY, Verdict.FAILED):
            self._note_oom(changes, step, outcome, code, now)

    def _note_oom(self, changes: Changes, step: StepRow, outcome: Outcome, code: int | None,
                  now: float) -> None:
        """Cool the runner's group down; a retry asks for more memory."""
        s = self.settings
        group = self._runner(step).group
        row = oom.start_cooldown(
            group, now, cooldown_s=s.oom_cooldown_s, throttle_hours=s.oom_throttle_hours,
            throttle_max=s.oom_throttle_max_concurrent, job_id=step.job_id,
            step_id=step.step_id, reason=f"OOM-like exit {step.job_id}/{step.step_id}: "
                                         f"{outcome.reason}")
        changes.cooldowns.append(row)
        changes.events.append(NewEvent(step.job_id, "oom_cooldown", now, step.step_id, {
            "group": group, "exit_code": code, "cooldown_until": row.cooldown_until,
            "throttle_until": row.throttle_until, "throttle_max": row.throttle_max}))
        if outcome.verdict != Verdict.RETRY:
            return
        cap = self.capacity.memory_mb
        if step.backend not in (None, "embedded"):
            # The backend's largest node, when it says; else the request may grow freely.
            node_max = self._executor(step.backend).capabilities().details.get(
                "memory_mb_per_node_max")
            cap = int(node_max) if isinstance(node_max, int) and node_max > 0 else UNBOUNDED
        raised = oom.raised_memory(step.memory_mb, s.oom_memory_factor, cap)
        if raised != step.memory_mb:
            changes.steps.append(StepUpdate(step.job_id, step.step_id, {"memory_mb": raised}))
            changes.events.append(NewEvent(step.job_id, "memory_raised", now, step.step_id, {
                "from_mb": step.memory_mb, "to_mb": raised, "attempt": step.attempt + 1}))

    def _judge(self, step: StepRow, paths: artifacts.AttemptPaths, code: int | None,
               kill: _Kill | None) -> tuple[Outcome, list[artifacts.OutputFile]]:
        runner = self._runner(step)
        missing = artifacts.missing_outputs(paths.output_dir, runner.outputs) if code == 0 else []
        links = artifacts.linked_outputs(paths.output_dir) if code == 0 else []
        stopping = step.job_id in self._cancelling or (kill is not None and kill.stop)
        reason = kill.reason if kill is not None and not kill.stop else None
        tampered = artifacts.modified_inputs(paths.root)
        if tampered:
            reason = ("changed its staged input(s) in place (inputs are read-only): "
                      + ", ".join(tampered))
        outcome = decide_outcome(
            exit_code=code, missing_outputs=missing, linked_outputs=links,
            kill_reason=reason,
            cancel_requested=stopping, retries=step.retries,
            failures=step.retries if tampered else step.failures,  # a retry would not help
            interruptions=step.attempt - 1 - step.failures,
            backoff_s=self.settings.retry_backoff_s, error_message=self._error_text(paths))
        if outcome.verdict != Verdict.SUCCEEDED:
            return outcome, []
        try:
            outputs = artifacts.register_outputs(paths.output_dir)
            for output in outputs:  # the step cache hashes them again as downstream inputs
                self.cache.memo.remember(output.path, output.blake3)
            return outcome, outputs
        except (OSError, ValueError) as exc:
            # The reason is shown to the job's owner: no server paths in it.
            reason = (str(exc) if isinstance(exc, ValueError)
                      else f"cannot read outputs: {exc.strerror or type(exc).__name__}")
            failed = decide_outcome(
                exit_code=None, missing_outputs=[], kill_reason=reason,
                cancel_requested=False, failures=step.failures, retries=step.retries,
                interruptions=0, backoff_s=self.settings.retry_backoff_s)
            return failed, []

    @staticmethod
    def _error_text(paths: artifacts.AttemptPaths) -> str | None:
        report = artifacts.read_error_report(paths.root)
        if report is not None:
            return f"{report.get('type')}: {report.get('message')}"
        last = artifacts.tail_lines(paths.stderr, 1)
        return last[0][:500] if last else None

    def _write_outcome(self, changes: Changes, step: StepRow, outcome: Outcome,
                       code: int | None, outputs: list[artifacts.OutputFile],
                       now: float) -> None:
        verdict = outcome.verdict
        attempt = AttemptRow(step.job_id, step.step_id, step.attempt, str(verdict),
                             step.started_at or now, now, code, outcome.reason, step.pid,
                             step.memory_mb, step.backend, step.backend_id)
        changes.attempts.append(attempt)
        data: dict[str, Any] = {"attempt": step.attempt, "exit_code": code}
        fields: dict[str, Any] = {"exit_code": code, "error": outcome.reason, "gpus": None}
        if verdict == Verdict.SUCCEEDED:
            fields.update(state=StepState.SUCCEEDED, finished_at=now)
            changes.outputs.extend(
                OutputRow(step.job_id, step.step_id, f.name, str(f.path), f.size, f.blake3)
                for f in outputs)
            changes.events.append(NewEvent(step.job_id, "step_succeeded", now, step.step_id,
                                           {**data, "outputs": len(outputs)}))
        elif verdict == Verdict.RETRY:
            fields.update(state=StepState.QUEUED, failures=step.failures + 1,
                          not_before=now + outcome.delay_s)
            changes.events.append(NewEvent(step.job_id, "step_failed", now, step.step_id,
                                           {**data, "reason": outcome.reason, "final": False}))
            changes.events.append(NewEvent(step.job_id, "retry_scheduled", now, step.step_id,
                                           {"attempt": step.attempt + 1,
                                            "delay_s": outcome.delay_s}))
        elif verdict == Verdict.REQUEUE:
            fields.update(state=StepState.QUEUED, not_before=None)
            changes.events.append(NewEvent(step.job_id, "step_requeued", now, step.step_id,
                                           {**data, "reason": outcome.reason}))
        elif verdict == Verdict.FAILED:
            fields.update(state=StepState.FAILED, failures=step.failures + 1, finished_at=now)
            changes.events.append(NewEvent(step.job_id, "step_failed", now, step.step_id,
                                           {**data, "reason": outcome.reason, "final": True}))
        else:
            fields.update(state=StepState.CANCELLED, finished_at=now)
            changes.events.append(NewEvent(step.job_id, "step_cancelled", now, step.step_id,
                                           {**data, "reason": "the job is stopping"}))
        changes.steps.append(StepUpdate(step.job_id, step.step_id, fields, StepState.RUNNING))

    # -- advance jobs
    def _advance(self, now: float) -> bool:
        if not self._touched:
            return False
        touched, self._touched = self._touched, set()
        changes = Changes()
        for job_id in sorted(touched):
            self._plan_job(changes, job_id, now)
        if changes:
            self._commit(changes)
        return bool(changes)

    def _plan_job(self, changes: Changes, job_id: str, now: float) -> None:
        job = self.store.get_job(job_id)
        if job is None or job.state in TERMINAL_JOB_STATES:
            self._cancelling.discard(job_id)
            return
        plan = plan_advance(job.steps, job.cancel_requested)
        for step_id in plan.queue:
            changes.steps.append(StepUpdate(job_id, step_id, {"state": StepState.QUEUED},
                                            StepState.PENDING))
            changes.events.append(NewEvent(job_id, "step_queued", now, step_id))
        by_id = {s.step_id: s for s in job.steps}
        for step_id in plan.cancel:
            changes.steps.append(StepUpdate(job_id, step_id, {
                "state": StepState.CANCELLED, "finished_at": now}, by_id[step_id].state))
            reason = "cancelled" if job.cancel_requested else "an upstream step failed"
            changes.events.append(NewEvent(job_id, "step_cancelled", now, step_id,
                                           {"reason": reason}))
        for step_id in plan.terminate:
            self._terminate(step_key(job_id, step_id), "the job is stopping", now, stop=True)
        if plan.job_state != job.state:
            self._set_job_state(changes, job, plan.job_state, now)

    def _set_job_state(self, changes: Changes, job: Any, state: JobState, now: float) -> None:
        fields: dict[str, Any] = {"state": state, "updated_at": now}
        if state in TERMINAL_JOB_STATES:
            fields["finished_at"] = now
            self._cancelling.discard(job.job_id)
        if state == JobState.FAILED:
            failed = [s for s in job.steps if s.state == StepState.FAILED]
            if failed:
                fields["error"] = f"step {failed[0].step_id!r} failed: {failed[0].error}"
        changes.jobs.append(JobUpdate(job.job_id, fields, job.state))
        kind = {JobState.RUNNING: "job_running", JobState.SUCCEEDED: "job_succeeded",
                JobState.FAILED: "job_failed", JobState.CANCELLED: "cancelled"}.get(state)
        if kind:
            changes.events.append(NewEvent(job.job_id, kind, now))

    # -- timeouts and stopping
    def _terminate(self, key: str, reason: str, now: float, stop: bool) -> None:
        if key in self._kills or key not in self._running:
            return
        self._kills[key] = _Kill(reason, now + self.settings.kill_grace_s, stop)
        self._executor_for(key).terminate(key)

    def _enforce_timeouts(self, now: float) -> None:
        for key, step in self._running.items():
            kill = self._kills.get(key)
            if kill is None:
                if self._executor_for(key).enforces_timeout:
                    continue  # the backend stops it itself, from when it really starts
                if step.started_at is not None and now - step.started_at > step.timeout_s:
                    self._terminate(key, f"timed out after {step.timeout_s:g} s", now, False)
            elif not kill.forced and now >= kill.force_at:
                kill.forced = True
                self._executor_for(key).terminate(key, force=True)

    # -- admission
    def _runner(self, step: StepRow) -> RunnerDefinition:
        runner = self._runner_cache.get(step.runner_hash)
        if runner is None:
            runner = RunnerDefinition.model_validate(step.runner_def)
            self._runner_cache[step.runner_hash] = runner
        return runner

    def _admit(self, now: float) -> bool:
        if self._stop:
            return False
        limits = oom.group_limits(self._cooldowns.values(), now)
        queue = self._fair_queue(now, limits)
        if not queue:
            return False
        queue, followers, cached = self._resolve_cache(queue, now)
        by_key = {step_key(s.job_id, s.step_id): s for s in queue}
        local = {k: s for k, s in by_key.items() if self._backend(s) == "embedded"}
        delegated = {k: s for k, s in by_key.items() if k not in local}
        # Local steps lease this host's CPU, memory and GPUs; steps on a delegated backend
        # (Slurm, a gateway) lease nothing here but still count for concurrency groups.
        leases = [self._lease(k, s) for k, s in self._running.items()]
        decision = admit(self.capacity, leases,
                         [self._request(k, s) for k, s in local.items()], limits)
        self._fail_impossible(decision.never_fits, by_key, now)
        started = [by_key[k] for k in decision.admit]
        if delegated:
            leases += [Lease(k, 0, 0, self._runner(by_key[k]).group) for k in decision.admit]
            started += self._admit_delegated(delegated, leases, limits)
        if started:
            self._start(started, now, decision.devices)
        waited = self._follow(followers, now)
        return bool(started or decision.never_fits or cached or waited)

    def _backend(self, step: StepRow) -> str:
        return backend_of(self._runner(step), self.settings)

    def _lease(self, key: str, step: StepRow) -> Lease:
        group = self._runner(step).group
        if self._backend_of.get(key, "embedded") != "embedded":
            return Lease(key, 0, 0, group)
        return Lease(key, step.cpu_slots, step.memory_mb, group, tuple(step.gpus or ()))

    def _admit_delegated(self, queue: dict[str, StepRow], leases: list[Lease],
                         limits: dict[str, GroupLimit]) -> list[StepRow]:
        """Steps for Slurm or an external gateway: bounded by concurrency groups, OOM
        throttles and ``backend_max_submitted`` in flight; the backend queues them."""
        in_flight = sum(1 for key in self._running
                        if self._backend_of.get(key, "embedded") != "embedded")
        room = self.settings.backend_max_submitted - in_flight
        if room <= 0:
            return []
        capacity = Capacity(UNBOUNDED, UNBOUNDED, "delegated backend", "delegated backend")
        requests = [Request(k, 0, 0, self._runner(s).group, self._runner(s).max_concurrent)
                    for k, s in queue.items()]
        decision = admit(capacity, leases, requests, limits)
        return [queue[k] for k in decision.admit[:room]]

    def _request(self, key: str, step: StepRow) -> Request:
        runner = self._runner(step)
        return Request(key, step.cpu_slots, step.memory_mb, runner.group, runner.max_concurrent,
                       runner.resources.gpus, runner.resources.optional_gpus)

    def _fair_queue(self, now: float, limits: dict[str, GroupLimit]) -> list[StepRow]:
        """Ready steps in fair order across owners (see :mod:`jobcell.scheduler.fairness`).

        Each owner's best steps are read on their own, so one owner's long backlog cannot
        fill the admission window; owners with the fewest running steps are read first.
        """
        window = self._admission_window()
        excluded = self._saturated_runners(limits)
        owners = self.store.queued_owners()
        running = Counter(step.owner for step in self._running.values())
        if len(owners) <= 1:
            rows = self.store.ready_steps(now, window, excluded)
        else:
            owners = sorted(owners, key=lambda o: (running[o], self._last_served.get(o, -1))
                            )[:window]
            # Each owner's fair share of the window, plus one in case a share is short.
            per_owner = min(window, -(-window // len(owners)) + 1)
            rows = [row for owner in owners
                    for row in self.store.ready_steps(now, per_owner, excluded, owner=owner)]
        for row in rows:
            runner = self._runner(row)
            self._runner_groups[row.runner] = (runner.group, runner.max_concurrent)
        order = fair_order([Queued(i, r.owner, r.priority, r.seq) for i, r in enumerate(rows)],
                           running, self._last_served)
        return [rows[i] for i in order]  # type: ignore[index]

    def _admission_window(self) -> int:
        """How many queued steps to consider this round.

        Sized to the free CPU slots (plus a margin for steps that need none or do not fit
        yet) rather than the whole backlog: reading and parsing a thousand rows each round
        to start one step would cost more than running it.
        """
        local = [key for key in self._running if self._backend_of.get(key, "embedded")
                 == "embedded"]
        used = sum(self._running[key].cpu_slots for key in local)
        window = 2 * max(self.capacity.cpu_slots - used, 0) + 8
        if self.settings.executor_backend != "embedded" or any(
                executor.delegated for executor in self.executors.values()):
            # A delegated backend queues steps itself: also read up to what may still go
            # in flight there, so queued steps go out in few (array) submissions.
            window += max(self.settings.backend_max_submitted
                          - (len(self._running) - len(local)), 0)
        return min(ADMIT_BATCH, window)

    def _saturated_runners(self, limits: dict[str, GroupLimit]) -> set[str]:
        """Runners whose concurrency group cannot start a step now: at its
        ``max_concurrent`` or OOM throttle, or in an OOM cooldown.

        Their queued steps cannot start now; left in the admission window, a long backlog
        of them would keep every other runner's steps out of it.
        """
        running: Counter[str] = Counter()
        for step in self._running.values():
            runner = self._runner(step)
            self._runner_groups[step.runner] = (runner.group, runner.max_concurrent)
            running[runner.group] += 1
        saturated = set()
        for name, (group, own_cap) in self._runner_groups.items():
            limit = limits.get(group)
            if limit is not None and limit.blocked:
                saturated.add(name)
                continue
            # Each runner by its own cap: a group's runners may declare different ones.
            caps = [c for c in (own_cap, limit.max_concurrent if limit else None)
                    if c is not None]
            if caps and running[group] >= min(caps):
                saturated.add(name)
        return saturated

    # -- the step cache
    def _resolve_cache(self, queue: list[StepRow], now: float
                       ) -> tuple[list[StepRow], list[StepRow], bool]:
        """Serve cache hits, park steps whose twin runs; return the steps left to admit,
        the ones that wait on a twin admitted this round, and whether anything changed."""
        changes = Changes()
        remaining: list[StepRow] = []
        followers: list[StepRow] = []
        keyed: list[StepRow] = []
        for step in queue:
            if not step.cache:
                remaining.append(step)
                continue
            try:
                step.step_key = self.cache.known_key(step) or self.cache.key(
                    step, self._runner(step), self._upstream_attempts(step))
            except (OSError, ValueError) as exc:
                print(f"cannot hash the inputs of {step.job_id}/{step.step_id}, running it "
                      f"without the cache: {exc}", file=sys.stderr)
                remaining.append(step)
                continue
            keyed.append(step)
        pairs = {(step.step_key or "", step.cache_ns) for step in keyed}
        done = self.cache.done_twins(pairs)
        running = self.cache.running_twins(pairs)
        leaders: set[tuple[str, str]] = set()
        for step in keyed:
            pair = (step.step_key or "", step.cache_ns)
            if pair in leaders:
                followers.append(step)
            elif pair in done and self._copy_twin(changes, step, done[pair], now):
                continue
            elif pair in running:
                self._wait_for(changes, step, running[pair], now)
            else:
                leaders.add(pair)
                remaining.append(step)
        if changes:
            self._commit(changes)
        return remaining, followers, bool(changes)

    def _copy_twin(self, changes: Changes, step: StepRow, twin: StepRow, now: float) -> bool:
        """Make ``step`` a copy of its finished twin; False (nothing left behind) when the
        twin's files are gone or no longer match its registered outputs."""
        attempt = step.attempt + 1
        try:
            outputs = self.cache.materialise(step, twin, attempt)
        except OSError as exc:
            print(f"cannot reuse the outputs of {twin.job_id}/{twin.step_id}, running "
                  f"{step.job_id}/{step.step_id} instead: {exc}", file=sys.stderr)
            return False
        source = {"source_job": twin.job_id, "source_step": twin.step_id,
                  "step_key": step.step_key}
        changes.steps.append(StepUpdate(step.job_id, step.step_id, {
            "state": StepState.CACHED, "attempt": attempt, "started_at": now,
            "finished_at": now, "exit_code": 0, "error": None, "step_key": step.step_key},
            step.state))
        changes.attempts.append(AttemptRow(
            step.job_id, step.step_id, attempt, "cached", now, now, 0,
            f"copied from {twin.job_id}/{twin.step_id}", None, step.memory_mb))
        changes.outputs.extend(outputs)
        changes.events.append(NewEvent(step.job_id, "step_cached", now, step.step_id,
                                       {**source, "outputs": len(outputs)}))
        self._touched.add(step.job_id)
        self.cache.forget(step.job_id, step.step_id)
        return True

    def _wait_for(self, changes: Changes, step: StepRow, twin: StepRow, now: float) -> None:
        """Park ``step`` until its running twin ends; it holds no lease meanwhile."""
        changes.steps.append(StepUpdate(step.job_id, step.step_id, {
            "state": StepState.WAITING_CACHE, "step_key": step.step_key}, StepState.QUEUED))
        changes.events.append(NewEvent(step.job_id, "step_cache_wait", now, step.step_id, {
            "source_job": twin.job_id, "source_step": twin.step_id,
            "step_key": step.step_key}))
        self._touched.add(step.job_id)
        self.cache.forget(step.job_id, step.step_id)

    def _follow(self, followers: list[StepRow], now: float) -> bool:
        """Steps identical to one admitted this round wait for it; the others stay queued."""
        changes = Changes()
        for step in followers:
            assert step.step_key is not None
            twin = self.cache.running_twin(step.step_key, step.cache_ns)
            if twin is not None:
                self._wait_for(changes, step, twin, now)
        if changes:
            self._commit(changes)
        return bool(changes)

    def _settle_waiting(self, now: float) -> bool:
        """Steps waiting on a twin: copy it when it finished, run themselves when it did
        not succeed, keep waiting while it runs."""
        if now - self._waiting_checked < WAITING_RECHECK_S:
            return False
        self._waiting_checked = now
        changes = Changes()
        for step in self.store.steps_in_states([StepState.WAITING_CACHE]):
            if step.job_id in self._cancelling or step.step_key is None:
                continue
            done = self.cache.done_twin(step.step_key, step.cache_ns)
            if done is not None and self._copy_twin(changes, step, done, now):
                continue
            if self.cache.running_twin(step.step_key, step.cache_ns) is not None:
                continue
            changes.steps.append(StepUpdate(step.job_id, step.step_id,
                                            {"state": StepState.QUEUED},
                                            StepState.WAITING_CACHE))
            changes.events.append(NewEvent(step.job_id, "step_requeued", now, step.step_id, {
                "reason": "the identical step it waited for did not succeed; running it"}))
        if changes:
            self._commit(changes)
        return bool(changes)

    # -- garbage collection
    def _maybe_collect_garbage(self, now: float) -> None:
        interval = self.settings.gc_interval_s
        if not interval or now - self._last_gc < interval:
            return
        self._last_gc = now
        from jobcell import retention

        try:
            report = retention.collect(self.home, self.store,
                                       self.settings.gc_max_age_days or None, now,
                                       max_batches=1)
            if report.more:
                self._last_gc = now - interval + 1.0  # the rest a second later, in turns
        except (OSError, JobcellError) as exc:
            print(f"garbage collection failed: {exc}", file=sys.stderr)

    def _fail_impossible(self, never_fits: tuple[tuple[str, str], ...],
                         by_key: dict[str, StepRow], now: float) -> None:
        if not never_fits:
            return
        changes = Changes()
        for key, reason in never_fits:
            step = by_key[key]
            changes.steps.append(StepUpdate(step.job_id, step.step_id, {
                "state": StepState.FAILED, "finished_at": now,
                "error": f"can never run on this cell: {reason}"}, StepState.QUEUED))
            changes.events.append(NewEvent(step.job_id, "step_failed", now, step.step_id,
                                           {"reason": reason, "final": True}))
            self._touched.add(step.job_id)
        self._commit(changes)

    def _start(self, steps: list[StepRow], now: float,
               devices: Mapping[str, tuple[str, ...]]) -> None:
        changes = Changes()
        running: list[StepRow] = []
        for step in steps:
            gpus = list(devices.get(step_key(step.job_id, step.step_id), ()))
            step = replace(step, state=StepState.RUNNING, attempt=step.attempt + 1,
                           started_at=now, exit_code=None, pid=None, gpus=gpus or None,
                           backend=self._backend(step), backend_id=None)
            running.append(step)
            self.cache.forget(step.job_id, step.step_id)
            self._turn += 1
            self._last_served[step.owner] = self._turn
            changes.steps.append(StepUpdate(step.job_id, step.step_id, {
                "state": StepState.RUNNING, "attempt": step.attempt, "started_at": now,
                "exit_code": None, "pid": None, "not_before": None, "gpus": step.gpus,
                "step_key": step.step_key, "backend": step.backend, "backend_id": None},
                StepState.QUEUED))
            changes.attempts.append(AttemptRow(step.job_id, step.step_id, step.attempt,
                                               "running", now, memory_mb=step.memory_mb,
                                               backend=step.backend))
            data: dict[str, Any] = {"attempt": step.attempt}
            if gpus:
                data["gpus"] = gpus
            if step.backend != "embedded":
                data["backend"] = step.backend
            changes.events.append(NewEvent(step.job_id, "step_started", now, step.step_id,
                                           data))
        self._commit(changes)  # committed as running before anything is submitted
        _fault("after_start_commit")
        batches: dict[str, list[Launch]] = {}
        for step in running:
            key = step_key(step.job_id, step.step_id)
            self._running[key] = step
            self._touched.add(step.job_id)
            launch = self._prepare(step, key)
            if launch is not None:
                batches.setdefault(step.backend or "embedded", []).append(launch)
        ids: dict[str, str] = {}
        for backend, launches in batches.items():
            ids.update(self._submit(backend, launches))
        _fault("after_spawn")
        self._record_submissions(ids, now)

    def _prepare(self, step: StepRow, key: str) -> Launch | None:
        """Prepare the attempt directory and describe how to start it.

        When that fails, the attempt is tracked with no process (it ends at the next poll)
        and the reason is kept: it fails like any attempt (retries apply) with that reason.
        """
        attempt_dir = self.home.attempt_dir(step.job_id, step.step_id, step.attempt)
        backend = step.backend or "embedded"
        try:
            executor = self._executor(backend)
            clear_cache_leftover(attempt_dir)
            return build_launch(
                key=key, step=step, runner=self._runner(step), attempt_dir=attempt_dir,
                upstream={up: self.home.attempt_dir(step.job_id, up, attempt) / "output"
                          for up, attempt in self._upstream_attempts(step).items()},
                gpu_env=backend == "embedded" and bool(self.capacity.gpus or step.gpus),
                cell_id=self.home.cell_id, backend_path=executor.backend_path,
                container_options=(self._container_options(executor)
                                   if self._runner(step).container is not None else None),
                files={name: self.home.upload_path(digest)
                       for name, digest in step.files.items()})
        except (OSError, ValueError, JobcellError) as exc:
            self._not_started(key, attempt_dir, step.attempt, exc)
            return None

    def _container_options(self, executor: Executor) -> ContainerOptions:
        if executor.delegated:
            backend_gpus = executor.capabilities().gpus
        else:
            backend_gpus = self.capacity.gpu_count
        return ContainerOptions.from_settings(self.settings, backend_gpus=backend_gpus,
                                              environ=os.environ,
                                              probe_local=not executor.delegated)

    def _not_started(self, key: str, attempt_dir: Path, attempt: int, exc: Exception) -> None:
        print(f"cannot start {key} attempt {attempt}: {exc}", file=sys.stderr)
        self._kills[key] = _Kill(f"could not start: {exc}", float("inf"), stop=False,
                                 forced=True)
        self._backend_of[key] = "embedded"
        self.executor.adopt(key, attempt_dir, None)

    def _submit(self, backend: str, launches: list[Launch]) -> dict[str, str]:
        """Hand launches to their executor; key -> backend id for those it started.

        Embedded attempts start one by one (one that cannot start fails alone); a
        delegated executor gets the whole batch, to submit arrays in few calls.
        """
        executor = self.executors[backend]
        groups = [[launch] for launch in launches] if not executor.delegated else [launches]
        ids: dict[str, str] = {}
        for group in groups:
            try:
                started = executor.submit(group)
            except Exception as exc:
                tracked = getattr(executor, "tracked", lambda: set())()
                for launch in group:
                    if launch.key in tracked:
                        # The executor follows it (it may have reached the backend).
                        self._backend_of[launch.key] = backend
                    else:
                        self._not_started(launch.key, launch.attempt_dir,
                                          self._running[launch.key].attempt, exc)
                continue
            for launch in group:
                self._backend_of[launch.key] = backend
            ids.update(started)
        return ids

    def _record_submissions(self, ids: Mapping[str, str], now: float) -> None:
        changes = Changes()
        for key, backend_id in ids.items():
            step = self._running[key]
            step.backend_id = backend_id
            fields: dict[str, Any] = {"backend_id": backend_id}
            if step.backend == "embedded" and backend_id.isdigit():
                step.pid = int(backend_id)
                fields["pid"] = step.pid
            else:
                changes.events.append(NewEvent(step.job_id, "step_submitted", now,
                                               step.step_id, {"backend": step.backend,
                                                              "backend_id": backend_id,
                                                              "attempt": step.attempt}))
            changes.steps.append(StepUpdate(step.job_id, step.step_id, fields))
        if changes:
            self._commit(changes)

    def _upstream_attempts(self, step: StepRow) -> dict[str, int]:
        if not step.inputs:
            return {}
        job = self.store.get_job(step.job_id)
        attempts = {s.step_id: s.attempt for s in job.steps} if job else {}
        return {up: attempts[up] for up in step.inputs}


def main(argv: list[str] | None = None) -> int:
    """Daemon entry: ``python -m jobcell.worker --home HOME``."""
    parser = argparse.ArgumentParser(prog="jobcell-worker")
    parser.add_argument("--home", required=True)
    parser.add_argument("--until-idle", action="store_true")
    args = parser.parse_args(argv)
    try:
        home = open_home(args.home)
        settings = load_settings(home.config_file)
        worker = Worker(home, settings, SQLiteStore(home.db_path))
        signal.signal(signal.SIGTERM, worker.request_stop)
        signal.signal(signal.SIGINT, worker.request_stop)
        worker.run(until_idle=args.until_idle)
    except WorkerAlreadyRunning as exc:
        print(str(exc), file=sys.stderr)
        return 3
    except JobcellError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
