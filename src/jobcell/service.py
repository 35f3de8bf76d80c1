"""The service API: the one API every front end (CLI, HTTP, Python client) calls."""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import math
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobcell import __version__, artifacts, wakeup
from jobcell.errors import NotFoundError, QuotaError, SpecError
from jobcell.home import CellHome, open_home
from jobcell.model.states import ACTIVE_JOB_STATES, TERMINAL_JOB_STATES, JobState, StepState
from jobcell.settings import Settings, load_settings
from jobcell.store import JobRow, NewEvent, StepRow
from jobcell.store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from jobcell.model.runner import RunnerDefinition
    from jobcell.model.spec import CompiledJob
    from jobcell.registry import RunnerRegistry
    from jobcell.scheduler.capacity import Capacity

# Heavier modules (pydantic models, the registry, the worker) are imported where they are
# used, so that read-only front-end calls such as ``jobcell status`` start fast.

DEDUP_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED)


_ISO_DAYS: dict[int, str] = {}     # days since 1970 -> "YYYY-MM-DDT"
_ISO_MINUTES = tuple(f"{m // 60:02d}:{m % 60:02d}:" for m in range(1440))
_ISO_SECONDS = tuple(f"{s:02d}." for s in range(60))
_ISO_MILLIS = tuple(f"{ms:03d}Z" for ms in range(1000))


def iso(timestamp: float | None) -> str | None:
    """A UNIX time as ISO 8601 UTC with milliseconds (``2026-11-21T09:13:00.123Z``), or None.

    The same text as ``datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")``
    with ``Z`` for ``+00:00`` (rounded to the microsecond half to even, then truncated to
    the millisecond), in a third of the time: a job list formats two per job. Dates come from a
    cache by day, the rest from tables.
    """
    if timestamp is None:
        return None
    if not 0.0 <= timestamp <= 253402300799.0:
        timestamp = min(max(timestamp, 0.0), 253402300799.0)  # within years 1970..9999
    # What datetime.fromtimestamp does: split off the second, round the fraction to
    # microseconds half to even, carry a rounded-up 1_000_000.
    fraction, whole = math.modf(timestamp)
    micros = round(fraction * 1e6)
    second = int(whole)
    if micros >= 1_000_000:
        second += 1
        micros -= 1_000_000
    day, in_day = divmod(second, 86_400)
    date = _ISO_DAYS.get(day)
    if date is None:
        if len(_ISO_DAYS) >= 100_000:
            _ISO_DAYS.clear()
        date = _ISO_DAYS[day] = datetime.fromtimestamp(day * 86_400, UTC).strftime("%Y-%m-%dT")
    minute, sec = divmod(in_day, 60)
    return date + _ISO_MINUTES[minute] + _ISO_SECONDS[sec] + _ISO_MILLIS[micros // 1000]


def new_job_id(now: float) -> str:
    """A job id that sorts by creation time: milliseconds, then 12 random hex digits."""
    return f"{int(now * 1000):011x}-{secrets.token_hex(6)}"


def default_owner() -> str:
    """The OS user, the owner of jobs submitted from this process."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid-{os.getuid()}"


@dataclass(frozen=True)
class SubmitResult:
    """What submit answers: the job id, and whether an identical job was reused."""

    job_id: str
    deduplicated: bool

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``{"job_id", "deduplicated"}``."""
        return {"job_id": self.job_id, "deduplicated": self.deduplicated}


class Cell:
    """One cell, opened from its home: submit work and observe it."""

    def __init__(self, home: str | os.PathLike[str] | CellHome | None = None, *,
                 settings: dict[str, Any] | None = None, auto_worker: bool = True) -> None:
        self.home = home if isinstance(home, CellHome) else open_home(home)
        self.settings: Settings = load_settings(self.home.config_file, overrides=settings)
        self.store = SQLiteStore(self.home.db_path)
        self.auto_worker = auto_worker
        self._capacity: Capacity | None = None

    def close(self) -> None:
        """Close this process's connection to the state database."""
        self.store.close()

    def __enter__(self) -> Cell:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @cached_property
    def registry(self) -> RunnerRegistry:
        """The cell's runner registry (``runners/`` plus ``runner_registry_paths``)."""
        from jobcell.registry import RunnerRegistry

        paths = [self.home.runners, *(Path(p) for p in self.settings.runner_registry_paths)]
        return RunnerRegistry(paths, autosync=self.settings.runner_registry_autosync)

    @property
    def capacity(self) -> Capacity:
        """The CPU slots, memory and GPUs this cell leases out (measured once per Cell)."""
        if self._capacity is None:
            from jobcell.scheduler.capacity import detect_capacity

            s = self.settings
            self._capacity = detect_capacity(s.cpu_slots, s.node_memory_mb, s.memory_reserve_mb,
                                             s.gpu_count)
        return self._capacity

    @cached_property
    def _host_capacity(self) -> Capacity:
        """CPU slots and memory, without running nvidia-smi (cheap, for submit checks)."""
        if self._capacity is not None:
            return self._capacity
        from jobcell.scheduler.capacity import detect_capacity

        s = self.settings
        return detect_capacity(s.cpu_slots, s.node_memory_mb, s.memory_reserve_mb, s.gpu_count,
                               detect_gpus=False)

    # -- runners
    def runners(self) -> dict[str, RunnerDefinition]:
        """Every registered runner by name."""
        return self.registry.runners()

    def runner(self, name: str) -> RunnerDefinition:
        """One registered runner, or :class:`NotFoundError`."""
        runner = self.registry.get(name)
        if runner is None:
            raise NotFoundError(f"no runner named {name!r} is registered in {self.home.root}")
        return runner

    def register_runner(self, definition: dict[str, Any] | Callable[..., Any], *,
                        name: str | None = None, overwrite: bool = True,
                        **fields: Any) -> RunnerDefinition:
        """Register a runner from a dict (YAML fields) or a module-level Python function."""
        from jobcell.registry import callable_runner_data, write_runner

        data = (callable_runner_data(definition, name, **fields) if callable(definition)
                else {**definition, **fields, **({"name": name} if name else {})})
        write_runner(self.home.runners, data, overwrite=overwrite)
        self.registry.refresh()
        return self.runner(data["name"])

    # -- submit
    def submit(self, spec: Any, *, owner: str | None = None, label: str | None = None,
               tags: Sequence[str] = (), dedup: bool = True) -> SubmitResult:
        """Validate and store one job (or return an identical active/succeeded one;
        ``dedup=False`` always makes a new job, whose steps may still be cache hits)."""
        return self.submit_many([spec], owner=owner, label=label, tags=tags, dedup=dedup)[0]

    def submit_many(self, specs: Iterable[Any], *, owner: str | None = None,
                    label: str | None = None, tags: Sequence[str] = (),
                    dedup: bool = True) -> list[SubmitResult]:
        """Validate and store many jobs in one transaction (all or none)."""
        owner = owner or default_owner()
        runners = self.runners()
        now = time.time()
        compiled = [self._compile(spec, runners, label, tags, i, owner)
                    for i, spec in enumerate(specs)]
        # Dedup, quotas and the insert form one decision: submitters take turns, so two of
        # them cannot both create "the" job for one spec_hash or both fit the last quota slot.
        with self._submit_lock():
            results, rows, events = self._new_rows(compiled, owner, now, dedup)
            self._check_quotas(owner, len(rows))
            if rows:
                self.store.insert_jobs(rows, events)
        if rows:
            wakeup.notify(self.home.wake_pipe)
            if self.auto_worker:
                self.ensure_worker()
        return results

    @contextlib.contextmanager
    def _submit_lock(self) -> Iterator[None]:
        with (self.home.locks / "submit.lock").open("w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            yield

    def _new_rows(self, compiled: list[CompiledJob], owner: str, now: float, dedup: bool
                  ) -> tuple[list[SubmitResult], list[JobRow], list[NewEvent]]:
        results: list[SubmitResult] = []
        rows: list[JobRow] = []
        events: list[NewEvent] = []
        fresh: dict[str, str] = {}
        for job in compiled:
            existing = self._dedup(job, owner, fresh) if dedup else None
            if existing is not None:
                results.append(SubmitResult(existing, True))
                continue
            # A microsecond apart, so "newest first" keeps the order of the batch.
            row = self._job_row(job, owner, now + len(rows) * 1e-6)
            fresh[job.spec_hash] = row.job_id
            rows.append(row)
            events.append(NewEvent(row.job_id, "submitted", now, None,
                                   {"owner": owner, "steps": len(row.steps)}))
            results.append(SubmitResult(row.job_id, False))
        return results, rows, events

    def _compile(self, spec: Any, runners: dict[str, RunnerDefinition], label: str | None,
                 tags: Sequence[str], position: int, owner: str) -> CompiledJob:
        from jobcell.model.spec import compile_spec
        from jobcell.scheduler.admission import never_fits_reason

        if isinstance(spec, dict) and (label is not None or tags):
            spec = dict(spec)
            if label is not None:
                spec["label"] = label
            existing = spec.get("tags")
            if tags and (existing is None or isinstance(existing, (list, tuple))):
                spec["tags"] = [*(existing or []), *tags]
        try:
            job = compile_spec(spec, runners,
                               upload_size=lambda digest: self.store.upload_size(digest, owner))
        except SpecError as exc:
            raise SpecError(f"job {position}: {exc}" if position else str(exc)) from None
        for step in job.steps:
            if (step.runner.executor or self.settings.executor_backend) != "embedded":
                continue  # runs on Slurm or a site's gateway: that backend judges the request
            # GPUs are detected (nvidia-smi) only when a step needs some.
            capacity = self.capacity if step.resources.gpus else self._host_capacity
            reason = never_fits_reason(capacity, step.resources.cpu_slots,
                                       step.resources.memory_mb, step.resources.gpus)
            if reason is not None:
                raise SpecError(f"node {step.step_id!r} (runner {step.runner.name!r}) {reason}")
        return job

    def _dedup(self, job: CompiledJob, owner: str, fresh: dict[str, str]) -> str | None:
        # A step that opted out of caching (``cache: false`` on the node, or a runner with
        # ``cacheable: false``) must run again, so its job cannot be replaced by a twin.
        if not job.cache or not all(step.cache for step in job.steps):
            return None
        if job.spec_hash in fresh:
            return fresh[job.spec_hash]
        return self.store.find_job_by_spec_hash(job.spec_hash, owner, DEDUP_STATES)

    def _check_quotas(self, owner: str, adding: int) -> None:
        if adding == 0:
            return
        active = self.store.count_jobs(states=ACTIVE_JOB_STATES)
        if active + adding > self.settings.max_jobs_global:
            raise QuotaError(f"the cell already has {active} active jobs; max_jobs_global is "
                             f"{self.settings.max_jobs_global}")
        per_user = self.settings.max_jobs_per_user
        if per_user is not None:
            mine = self.store.count_jobs(states=ACTIVE_JOB_STATES, owner=owner)
            if mine + adding > per_user:
                raise QuotaError(f"owner {owner!r} already has {mine} active jobs; "
                                 f"max_jobs_per_user is {per_user}")

    @staticmethod
    def _job_row(job: CompiledJob, owner: str, now: float) -> JobRow:
        job_id = new_job_id(now)
        steps = [StepRow(
            job_id=job_id, step_id=s.step_id, index=s.index, runner=s.runner.name,
            runner_hash=s.runner_hash, runner_def=s.runner.model_dump(mode="json"),
            params=s.params, inputs=list(s.inputs), input_layout=s.input_layout, cache=s.cache,
            cpu_slots=s.resources.cpu_slots, memory_mb=s.resources.memory_mb,
            timeout_s=s.resources.timeout_s, retries=s.runner.retries,
            state=StepState.PENDING if s.inputs else StepState.QUEUED,
            priority=job.priority, owner=owner,
            cache_ns="*" if s.runner.cache_scope == "cell" else job.label,
            files=s.files, profile=s.profile) for s in job.steps]
        return JobRow(job_id=job_id, label=job.label, owner=owner, tags=list(job.tags),
                      priority=job.priority, state=JobState.QUEUED, spec=job.spec,
                      spec_hash=job.spec_hash, created_at=now, updated_at=now, steps=steps)

    # -- uploads and users (the HTTP server's front door)
    def upload(self, chunks: Iterable[bytes], *, owner: str | None = None) -> dict[str, Any]:
        """Store an input file by content; a job step names it in ``files`` by digest."""
        from jobcell.uploads import store_upload

        return store_upload(self.home, self.store, chunks, owner or default_owner(),
                            self.settings.upload_max_mb * 1024 * 1024)

    def open_upload(self, *, owner: str | None = None) -> Any:
        """An upload fed chunk by chunk (``write``, ``finish`` -> ``{"digest", "size"}``,
        ``abort``): for front ends that receive the bytes over time."""
        from jobcell.uploads import Upload

        return Upload(self.home, self.store, owner or default_owner(),
                      self.settings.upload_max_mb * 1024 * 1024)

    def upload_output(self, job_id: str, step: str, name: str, *,
                      owner: str | None = None) -> dict[str, Any]:
        """Make one of your job's output files an upload of yours (``{"digest", "size"}``),
        so that another job can name it in a step's ``files``: a file passed on from
        task to task without a round trip through the client."""
        from jobcell.uploads import store_upload

        owner = owner or default_owner()
        self._job(job_id, owner, with_steps=False)
        row = next((o for o in self.store.outputs(job_id)
                    if o.step_id == step and o.name == name), None)
        if row is None:
            raise NotFoundError(f"job {job_id} has no output {name!r} of step {step!r}")

        def chunks() -> Iterator[bytes]:
            with open(row.path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    yield chunk
        try:
            return store_upload(self.home, self.store, chunks(), owner,
                                self.settings.upload_max_mb * 1024 * 1024)
        except FileNotFoundError:
            raise NotFoundError(f"output {name!r} of step {step!r} of job {job_id} is gone "
                                "from the cell (collected?)") from None

    def add_user(self, name: str) -> dict[str, Any]:
        """Add an API user; the answer holds their bearer token (shown only here)."""
        from jobcell import accounts

        return accounts.add_user(self.store, name)

    def users(self) -> list[dict[str, Any]]:
        """Every API user (never a token)."""
        from jobcell import accounts

        return accounts.list_users(self.store)

    def revoke_user(self, name: str) -> dict[str, Any]:
        """Revoke an API user's token."""
        from jobcell import accounts

        return accounts.revoke_user(self.store, name)

    def authenticate(self, token: str) -> str | None:
        """The user holding this bearer token, or None (unknown or revoked)."""
        from jobcell import accounts

        return accounts.authenticate(self.store, token)

    # -- the session plane
    def run_session(self, runner_name: str, params: dict[str, Any] | None = None, *,
                    timeout_s: float | None = None) -> dict[str, Any]:
        """Run a session-plane runner inline (not queued) and return its value and logs.

        Session work is short and synchronous: it gets no job id and leaves nothing in the
        cell's state; its attempt directory under ``staging/`` is removed afterwards. It
        runs through the same wrapper as artifact steps, never through a shell.
        """
        runner = self.runner(runner_name)
        if runner.plane != "session":
            raise SpecError(f"runner {runner_name!r} is an artifact-plane runner; submit it "
                            "as a job instead of running it inline")
        from jobcell.model.params import validate_params

        try:
            values = validate_params(runner.params, params or {}, f"runner {runner_name!r}")
        except ValueError as exc:
            raise SpecError(str(exc)) from None
        root = Path(tempfile.mkdtemp(prefix="session-", dir=self.home.staging))
        try:
            return self._run_inline(runner, values, root / "attempt",
                                    timeout_s or runner.resources.timeout_s)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def _run_inline(self, runner: RunnerDefinition, params: dict[str, Any], attempt_dir: Path,
                    timeout_s: float) -> dict[str, Any]:
        from jobcell.executors.base import Launch
        from jobcell.executors.embedded import install_wrapper, run_inline
        from jobcell.model.advance import Verdict, decide_outcome
        from jobcell.model.runner import runner_argv, runner_environment, runner_values

        paths = artifacts.prepare_attempt(attempt_dir, params, {}, "flat",
                                          step_input=runner.python is not None)
        argv = runner_argv(runner, runner_values(runner, params, str(attempt_dir),
                                                 str(paths.input_dir), str(paths.output_dir)))
        env = runner_environment(runner, os.environ, {"JOBCELL_STEP_DIR": str(attempt_dir),
                                                      "JOBCELL_ATTEMPT": "1"})
        install_wrapper(self.home.wrapper_script)
        code, timed_out = run_inline(self.home.wrapper_script,
                                     Launch("session", attempt_dir, tuple(argv), env),
                                     timeout_s, self.settings.kill_grace_s)
        report = artifacts.read_error_report(attempt_dir)
        stopped = (f"timed out after {timeout_s:g} s" if timed_out
                   else "ended without recording an exit code" if code is None else None)
        outcome = decide_outcome(
            exit_code=code,
            missing_outputs=artifacts.missing_outputs(paths.output_dir, runner.outputs),
            linked_outputs=artifacts.linked_outputs(paths.output_dir),
            kill_reason=stopped, cancel_requested=False, failures=0, retries=0,
            interruptions=0, backoff_s=0,
            error_message=f"{report.get('type')}: {report.get('message')}" if report else None)
        succeeded = outcome.verdict == Verdict.SUCCEEDED
        return {"runner": runner.name, "succeeded": succeeded, "exit_code": code,
                "error": outcome.reason, "runner_hash": runner.definition_hash(),
                "value": artifacts.read_value(paths.output_dir) if succeeded else None,
                "stdout": artifacts.tail_lines(paths.stdout, 200),
                "stderr": artifacts.tail_lines(paths.stderr, 200)}

    # -- observe
    def _job(self, job_id: str, owner: str | None = None, with_steps: bool = True) -> JobRow:
        job = self.store.get_job(job_id, with_steps=with_steps)
        if job is None or (owner is not None and job.owner != owner):
            raise NotFoundError(f"no job with id {job_id!r}")
        return job

    def status(self, job_id: str, *, owner: str | None = None) -> dict[str, Any]:
        """The job's state and every step's state, attempt and exit code."""
        return job_status(self._job(job_id, owner))

    def list(self, *, label: str | None = None, state: str | None = None,
             tag: str | None = None, owner: str | None = None, limit: int = 100,
             offset: int = 0) -> list[dict[str, Any]]:
        """Jobs, newest first, filtered by label, state, tag and owner."""
        wanted = _parse_state(state) if state else None
        rows = self.store.list_job_summaries(label=label, state=wanted, tag=tag, owner=owner,
                                             limit=limit, offset=offset)
        return [{"job_id": r.job_id, "state": r.state, "label": r.label, "owner": r.owner,
                 "tags": r.tags, "priority": r.priority, "created_at": iso(r.created_at),
                 "finished_at": iso(r.finished_at), "error": r.error} for r in rows]

    def events(self, job_id: str, *, owner: str | None = None,
               after_seq: int = 0) -> list[dict[str, Any]]:
        """The job's events, oldest first."""
        self._job(job_id, owner, with_steps=False)
        events = [{"seq": e.seq, "kind": e.kind, "step": e.step_id, "at": iso(e.at), **e.data}
                  for e in self.store.events(job_id, after_seq)]
        if owner is not None:
            self._hide_foreign_sources(events, owner)
        return events

    def _hide_foreign_sources(self, events: list[dict[str, Any]], owner: str) -> None:
        """A step-cache event names the twin it copied or waits for; when that twin is
        another owner's, its ids are not this owner's to see."""
        owners: dict[str, str | None] = {}
        for event in events:
            source = event.get("source_job")
            if not isinstance(source, str):
                continue
            if source not in owners:
                twin = self.store.get_job(source, with_steps=False)
                owners[source] = twin.owner if twin is not None else None
            if owners[source] != owner:
                event["source_job"] = "another owner's job"
                event.pop("source_step", None)

    def outputs(self, job_id: str, *, owner: str | None = None) -> list[dict[str, Any]]:
        """Every output file: step, name, path, size and BLAKE3 digest."""
        self._job(job_id, owner, with_steps=False)
        return [{"step": o.step_id, "name": o.name, "path": o.path, "size": o.size,
                 "blake3": o.blake3} for o in self.store.outputs(job_id)]

    def result(self, job_id: str, *, owner: str | None = None) -> dict[str, Any]:
        """Each step's JSON value (``output.json``) and the value of the final step(s)."""
        job = self._job(job_id, owner)
        values = {}
        for step in job.steps:
            if step.state in (StepState.SUCCEEDED, StepState.CACHED):
                out = self.home.attempt_dir(job_id, step.step_id, step.attempt) / "output"
                values[step.step_id] = artifacts.read_value(out)
        consumed = {i for s in job.steps for i in s.inputs}
        sinks = [s.step_id for s in job.steps if s.step_id not in consumed]
        final = (values.get(sinks[0]) if len(sinks) == 1
                 else {sid: values.get(sid) for sid in sinks})
        return {"job_id": job_id, "state": str(job.state), "error": job.error,
                "result": final if job.state == JobState.SUCCEEDED else None,
                "steps": values, "outputs": self.outputs(job_id)}

    def logs(self, job_id: str, *, step: str | None = None, last_n: int = 50,
             owner: str | None = None) -> dict[str, Any]:
        """The last ``last_n`` lines of stdout and stderr of each step's latest attempt."""
        job = self._job(job_id, owner)
        steps = [s for s in job.steps if step is None or s.step_id == step]
        if step is not None and not steps:
            raise NotFoundError(f"job {job_id!r} has no step {step!r}")
        entries = []
        for s in steps:
            if s.attempt == 0:
                entries.append({"step": s.step_id, "attempt": 0, "stdout": [], "stderr": []})
                continue
            paths = artifacts.AttemptPaths(self.home.attempt_dir(job_id, s.step_id, s.attempt))
            entries.append({"step": s.step_id, "attempt": s.attempt,
                            "stdout": artifacts.tail_lines(paths.stdout, last_n),
                            "stderr": artifacts.tail_lines(paths.stderr, last_n)})
        return {"job_id": job_id, "steps": entries}

    def cancel(self, job_id: str, *, owner: str | None = None,
               wait_s: float = 10.0) -> dict[str, Any]:
        """Ask the worker to cancel the job; wait up to ``wait_s`` for it to take effect."""
        job = self._job(job_id, owner, with_steps=False)
        if job.state in TERMINAL_JOB_STATES:
            return {"job_id": job_id, "state": str(job.state), "cancelled": False,
                    "reason": f"the job is already {job.state}"}
        self.store.request_cancel(job_id, time.time())
        wakeup.notify(self.home.wake_pipe)
        if self.auto_worker:
            self.ensure_worker()
        deadline = time.time() + wait_s
        while time.time() < deadline:
            job = self._job(job_id, with_steps=False)
            if job.state in TERMINAL_JOB_STATES:
                break
            time.sleep(0.05)
        return {"job_id": job_id, "state": str(job.state),
                "cancelled": job.state == JobState.CANCELLED}

    def wait(self, job_id: str, *, timeout_s: float | None = None, poll_s: float = 0.1,
             owner: str | None = None,
             on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Block until the job ends (or ``timeout_s`` passes); returns its final status."""
        deadline = None if timeout_s is None else time.time() + timeout_s
        checked_worker = 0.0
        while True:
            status = self.status(job_id, owner=owner)
            if on_progress is not None:
                on_progress(status)
            if status["state"] in TERMINAL_JOB_STATES:
                return status
            if deadline is not None and time.time() >= deadline:
                return status
            if self.auto_worker and time.time() - checked_worker > 2.0:
                checked_worker = time.time()
                self.ensure_worker()
            time.sleep(poll_s)

    # -- queries for domain packages
    def query_jobs_by_tag(self, tag_pattern: str,
                          states: Iterable[str] | None = None) -> list[str]:
        """Job ids with a tag matching the glob ``tag_pattern``, oldest first."""
        wanted = [_parse_state(s) for s in states] if states is not None else None
        return self.store.job_ids_by_tag(tag_pattern, wanted)

    def query_failed_jobs(self, tag_pattern: str) -> list[str]:
        """Ids of failed jobs with a tag matching the glob ``tag_pattern``."""
        return self.store.job_ids_by_tag(tag_pattern, [JobState.FAILED])

    def count_active_jobs(self, tag_pattern: str | None = None) -> int:
        """How many queued or running jobs (with a tag matching ``tag_pattern``) there are."""
        return self.store.count_jobs(states=ACTIVE_JOB_STATES, tag_pattern=tag_pattern)

    # -- cell
    def capabilities(self) -> dict[str, Any]:
        """What this cell offers and where each figure came from; for a delegated
        backend (Slurm, external) also what the backend reports (probed now)."""
        result = {"executor_backend": self.settings.executor_backend,
                  **self.capacity.to_dict(),
                  "hostname": socket.gethostname(), "home": str(self.home.root),
                  "python": sys.version.split()[0], "jobcell_version": __version__}
        if self.settings.executor_backend != "embedded":
            result["backend"] = self._backend_capabilities(self.settings.executor_backend)
        return result

    def _backend_capabilities(self, name: str) -> dict[str, Any]:
        from jobcell.executors.select import make_executor

        executor = make_executor(name, self.home, self.settings)
        try:
            problem = executor.usable()
            if problem is not None:
                return {"backend": name, "usable": False, "problem": problem}
            return {**executor.capabilities().to_dict(), "usable": True}
        finally:
            executor.close()

    def scheduler_status(self) -> dict[str, Any]:
        """Capacity, used and free resources, leases by step, queue depth by runner and
        owner, cooldowns and throttles with their end times, the worker."""
        from jobcell.scheduler.oom import phase

        cap = self.capacity
        now = time.time()
        running = self.store.steps_in_states([StepState.RUNNING])
        used_cpu = sum(s.cpu_slots for s in running)
        used_memory = sum(s.memory_mb for s in running)
        used_gpus = sorted({g for s in running for g in (s.gpus or ())})
        by_runner: dict[str, int] = {}
        by_owner: dict[str, int] = {}
        for runner, owner, count in self.store.queue_depth():
            by_runner[runner] = by_runner.get(runner, 0) + count
            by_owner[owner] = by_owner.get(owner, 0) + count
        cooldowns = [{"group": c.group, "phase": phase(c, now), "reason": c.reason,
                      "since": iso(c.started_at), "cooldown_until": iso(c.cooldown_until),
                      "throttle_until": iso(c.throttle_until), "throttle_max": c.throttle_max}
                     for c in self.store.cooldowns() if phase(c, now) is not None]
        waiting = self.store.steps_in_states([StepState.WAITING_CACHE])
        return {
            "capacity": {"cpu_slots": cap.cpu_slots, "memory_mb": cap.memory_mb,
                         "gpus": [g.index for g in cap.gpus]},
            "used": {"cpu_slots": used_cpu, "memory_mb": used_memory, "gpus": used_gpus},
            "free": {"cpu_slots": cap.cpu_slots - used_cpu,
                     "memory_mb": cap.memory_mb - used_memory,
                     "gpus": [g.index for g in cap.gpus if g.index not in used_gpus]},
            "leases": [{"job_id": s.job_id, "step": s.step_id, "runner": s.runner,
                        "owner": s.owner, "cpu_slots": s.cpu_slots, "memory_mb": s.memory_mb,
                        "gpus": s.gpus or [], "attempt": s.attempt,
                        "started_at": iso(s.started_at)} for s in running],
            "queue": {"depth": sum(by_runner.values()), "by_runner": by_runner,
                      "by_owner": by_owner, "waiting_cache": len(waiting)},
            "cooldowns": cooldowns,
            "worker": self.worker_status()}

    def gc(self, *, older_than_days: float | None = None,
           dry_run: bool = False) -> dict[str, Any]:
        """Remove terminal jobs older than ``older_than_days`` (default: the cell's
        ``gc_max_age_days``) with their artifacts; ``dry_run`` only reports them."""
        from jobcell import retention

        if older_than_days is not None and not 0 <= older_than_days < float("inf"):
            raise SpecError("--older-than must be a non-negative number of days, got "
                            f"{older_than_days}")
        # The option's 0 means "keep forever"; an explicit --older-than 0 means "all".
        age = (older_than_days if older_than_days is not None
               else self.settings.gc_max_age_days or None)
        report = retention.collect(self.home, self.store, age, time.time(), dry_run=dry_run)
        return {**report.to_dict(), "older_than_days": age}

    def worker_status(self) -> dict[str, Any]:
        """``alive``, ``pid``, ``hostname``, ``heartbeat_age_s``, ``started_at``."""
        status = _daemon().worker_status(self.store, self.settings.worker_heartbeat_ttl_s)
        status["started_at"] = iso(status["started_at"])
        return status

    def ensure_worker(self) -> dict[str, Any]:
        """Start the embedded worker unless a live one serves this cell."""
        _daemon().start_worker(self.home, self.store, self.settings.worker_heartbeat_ttl_s)
        return self.worker_status()

    def stop_worker(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Stop the live worker with signals and clear its lock (running steps go on)."""
        return _daemon().stop_worker(self.store, self.settings.worker_heartbeat_ttl_s, timeout_s)


def _daemon() -> Any:
    from jobcell import daemon

    return daemon


def _parse_state(value: str) -> JobState:
    try:
        return JobState(value)
    except ValueError:
        known = ", ".join(s.value for s in JobState)
        raise SpecError(f"unknown job state {value!r} (known: {known})") from None


def job_summary(job: JobRow) -> dict[str, Any]:
    """The short form of a job, as :meth:`Cell.list` answers it (which builds it from a
    summary row, the same keys in the same order)."""
    return {"job_id": job.job_id, "state": str(job.state), "label": job.label,
            "owner": job.owner, "tags": job.tags, "priority": job.priority,
            "created_at": iso(job.created_at), "finished_at": iso(job.finished_at),
            "error": job.error}


def job_status(job: JobRow) -> dict[str, Any]:
    """The full status document of a job (the contract of ``status --json``)."""
    counts: dict[str, int] = {}
    for step in job.steps:
        counts[str(step.state)] = counts.get(str(step.state), 0) + 1
    done = counts.get("succeeded", 0) + counts.get("cached", 0)
    return {
        **job_summary(job), "spec_hash": job.spec_hash, "updated_at": iso(job.updated_at),
        "cancel_requested": job.cancel_requested,
        "progress": {"total": len(job.steps), "done": done, "states": counts},
        "steps": [{"id": s.step_id, "runner": s.runner, "state": str(s.state),
                   "attempt": s.attempt, "exit_code": s.exit_code, "error": s.error,
                   "inputs": s.inputs, "runner_hash": s.runner_hash,
                   "started_at": iso(s.started_at), "finished_at": iso(s.finished_at),
                   "backend": s.backend, "backend_id": s.backend_id, "profile": s.profile,
                   "cpu_slots": s.cpu_slots, "memory_mb": s.memory_mb, "files": s.files}
                  for s in job.steps]}
