"""External executor: the site admin's own wrapper commands submit, query and cancel steps.

The admin configures argv lists (never run through a shell):

- ``external_submit_cmd``: run once per attempt with the ``JOBCELL_*`` variables of
  :func:`submit_environment` added to the worker's environment. It must start
  ``JOBCELL_STEP_SCRIPT`` (the per-attempt ``step.sh``, as the backend sees it) somewhere
  and print the backend job id as the last non-empty line of its stdout.
- ``external_status_cmd``: run with one backend id as its last argument; prints one of
  ``RUNNING PENDING SUCCEEDED FAILED CANCELLED``, a terminal state optionally followed by
  an exit code (``FAILED 137``).
- ``external_cancel_cmd`` (optional): run with the backend id as its last argument;
  ``JOBCELL_CANCEL_SIGNAL`` is ``TERM``, or ``KILL`` when the worker forces the stop.
- ``backend_capabilities_cmd`` (optional): prints JSON (``{"gpus": 2}``) or ``key=value``
  lines (``gpus=2``); run once and cached.

The durable protocol holds as for every executor: ``step.sh`` execs the step wrapper, whose
``exit_code`` file is the authority on how the step ended; the status command only says
whether the backend still has the job and explains an end that left no ``exit_code``.
``external_backend.json`` records the backend id before :meth:`ExternalExecutor.submit`
returns, so a worker that dies right after submitting is recovered by
:meth:`ExternalExecutor.adopt`.

How a poll answers, for an attempt without an ``exit_code`` file:

- ``RUNNING``/``PENDING``: running.
- ``SUCCEEDED``/``FAILED``/``CANCELLED``: still running for ``backend_exit_code_grace_s``
  (shared filesystems lag), then ``SUCCEEDED`` is INTERRUPTED (never success without an
  ``exit_code``), ``FAILED [code]`` is FAILED with the code in the reason (OOM-like for
  137 or -9; the code is not an exit code of the step), ``CANCELLED`` is FAILED "cancelled
  by the backend". A ``CANCELLED`` attempt that never started (no ``child.pid``) ends at
  once: no ``exit_code`` can come.
- the status command fails (non-zero exit, cannot be run, timeout): UNKNOWN, logged once per
  outage, retried with backoff; a round stops at the first command that cannot be run.
- it prints something else: UNKNOWN, and :meth:`ExternalExecutor.last_error` says what.

``JOBCELL_STEP_INDEX`` is ``JOBCELL_STEP_INDEX`` from the launch's exports (the step's
0-based position in its job, when the worker sets it), else the step id.
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from jobcell.executors.base import BackendCapabilities, Launch, Phase, Status
from jobcell.executors.delegated import (
    BackendRecord,
    MissingClock,
    Outage,
    parse_exit_code,
    read_record,
    write_record,
)
from jobcell.executors.transport import CommandResult, LocalTransport, Transport, TransportError
from jobcell.launching import map_path
from jobcell.settings import Settings

NAME = "external"
STEP_SCRIPT = "step.sh"
STATES = ("RUNNING", "PENDING", "SUCCEEDED", "FAILED", "CANCELLED")
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")
SUBMIT_TIMEOUT_S = 60.0
STATUS_TIMEOUT_S = 30.0
CANCEL_TIMEOUT_S = 30.0
CAPABILITIES_TIMEOUT_S = 30.0
CAPABILITIES_RETRY_S = 60.0
MAX_ID_LENGTH = 256
OOM_CODES = (137, -9)

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+=;,-]*")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INT = re.compile(r"[+-]?[0-9]+")
_COUNTS = ("gpus", "nodes", "cpus", "memory_mb")


def _quote_output(text: str, limit: int = 200) -> str:
    """``text`` quoted for an error message, shortened when long."""
    if not text.strip():
        return "no output"
    shown = text if len(text) <= limit else text[:limit] + "..."
    return repr(shown)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# -- pure parts ---------------------------------------------------------------------------

def step_identity(launch: Launch) -> tuple[str, str, str]:
    """The job id, step id and step index of a launch.

    The ids come from ``launch.exports`` (``JOBCELL_JOB_ID``, ``JOBCELL_STEP_ID``), else
    from the key ``<job_id>/<step_id>``. The index is ``JOBCELL_STEP_INDEX`` from the exports
    (the step's 0-based position in its job, when the worker sets it), else the step id.
    """
    job_part, _, step_part = launch.key.partition("/")
    job_id = launch.exports.get("JOBCELL_JOB_ID") or job_part
    step_id = launch.exports.get("JOBCELL_STEP_ID") or step_part or launch.key
    index = launch.exports.get("JOBCELL_STEP_INDEX") or step_id
    return job_id, step_id, index


def requested_gpus(required: int, optional: int, backend_gpus: int | None) -> int:
    """GPUs to ask the backend for: the required ones, plus the optional ones when the
    backend reports GPUs (never more optional ones than it reports)."""
    if not optional or not backend_gpus or backend_gpus <= 0:
        return required
    return required + min(optional, max(0, backend_gpus - required))


def submit_environment(launch: Launch, *, backend_dir: str,
                       capabilities: BackendCapabilities | None = None) -> dict[str, str]:
    """The variables the submit command gets (added to the worker's environment).

    ``backend_dir`` is the attempt directory as the backend sees it; the step script is
    ``<dir>/step.sh`` and the output directory ``<dir>/output`` on both sides.
    ``capabilities`` is what the capabilities command reported (None when there is none).
    """
    job_id, step_id, index = step_identity(launch)
    resources = launch.resources
    backend_gpus = capabilities.gpus if capabilities is not None else None
    env = {
        "JOBCELL_JOB_ID": job_id,
        "JOBCELL_STEP_ID": step_id,
        "JOBCELL_STEP_INDEX": index,
        "JOBCELL_ATTEMPT": launch.exports.get("JOBCELL_ATTEMPT", ""),
        "JOBCELL_JOB_NAME": launch.job_name,
        "JOBCELL_RUNNER": launch.runner,
        "JOBCELL_STEP_SCRIPT": f"{backend_dir.rstrip('/')}/{STEP_SCRIPT}",
        "JOBCELL_OUTPUT_DIR": f"{backend_dir.rstrip('/')}/output",
        "JOBCELL_LOCAL_STEP_SCRIPT": str(launch.attempt_dir / STEP_SCRIPT),
        "JOBCELL_LOCAL_OUTPUT_DIR": str(launch.attempt_dir / "output"),
        "JOBCELL_BACKEND_DIR": backend_dir,
        "JOBCELL_LOCAL_DIR": str(launch.attempt_dir),
        "JOBCELL_MEMORY_MB": str(resources.memory_mb),
        "JOBCELL_CPU_SLOTS": str(resources.cpu_slots),
        "JOBCELL_TIMEOUT_S": str(math.ceil(resources.timeout_s)),
        "JOBCELL_GPUS_REQUIRED": str(resources.gpus),
        "JOBCELL_GPUS_OPTIONAL": str(resources.optional_gpus),
        "JOBCELL_GPUS_REQUESTED": str(requested_gpus(resources.gpus, resources.optional_gpus,
                                                     backend_gpus)),
        "JOBCELL_BACKEND_GPU_COUNT": "" if backend_gpus is None else str(backend_gpus),
        "JOBCELL_BACKEND_GPU_SOURCE": capabilities.gpu_source if capabilities is not None
        else "unknown",
    }
    return env


def step_script(launch: Launch, *, shell: str, wrapper: str, backend_dir: str,
                unset: Iterable[str] = ()) -> str:
    """The per-attempt ``step.sh``: export jobcell's variables, exec the step wrapper.

    Every value is quoted with :func:`shlex.quote`, so nothing the user controls is ever
    interpreted by the shell. ``unset``: variables the backend job would inherit from the
    worker but must not see (the worker's own ``JOBCELL_*`` settings, the admin key).
    Raises ValueError for an export whose name is not a shell variable name.
    """
    label = "".join(c if c.isprintable() else "?" for c in launch.key)  # a comment: one line
    lines = [f"#!{shell}",
             f"# jobcell step script for {label}: exports, then the step wrapper.",
             "set -u"]
    drop = sorted(name for name in set(unset) if name not in launch.exports)
    bad = [name for name in [*drop, *launch.exports] if not _NAME.fullmatch(name)]
    if bad:
        raise ValueError(f"cannot export {bad[0]!r}: not a shell variable name")
    if drop:
        lines.append("unset " + " ".join(drop))
    for name, value in launch.exports.items():
        if "\0" in value:
            raise ValueError(f"cannot export {name}: its value contains a NUL byte")
        lines.append(f"export {name}={shlex.quote(value)}")
    command = [shell, wrapper, backend_dir, *launch.argv]
    if any("\0" in part for part in command):
        raise ValueError("cannot run a command with a NUL byte in its arguments")
    lines.append("exec " + " ".join(shlex.quote(part) for part in command))
    return "\n".join(lines) + "\n"


def parse_submit_output(stdout: str) -> str:
    """The backend job id: the last non-empty line of the submit command's stdout, one
    token of sane characters. Raises ValueError (quoting the output) for anything else."""
    line = _last_line(stdout)
    expectation = ("the last non-empty line of its stdout must be the backend job id alone "
                   "(letters, digits and . _ : @ / + = ; , -)")
    if not line:
        raise ValueError(f"the external submit command printed no backend job id; {expectation}")
    if len(line) > MAX_ID_LENGTH or not _ID.fullmatch(line):
        raise ValueError(f"the external submit command printed {_quote_output(stdout)}, "
                         f"not a backend job id; {expectation}")
    return line


def parse_status_output(stdout: str) -> tuple[str, int | None]:
    """The state and exit code in the status command's stdout (its last non-empty line).

    Accepted: ``RUNNING``, ``PENDING``, or ``SUCCEEDED``/``FAILED``/``CANCELLED``
    optionally followed by an integer exit code (``FAILED 137``); case does not matter.
    Raises ValueError with a clear message for anything else.
    """
    expected = (f"expected one of {', '.join(STATES)}, a terminal state optionally "
                "followed by an exit code")
    line = _last_line(stdout)
    if not line:
        raise ValueError(f"the external status command printed nothing; {expected}")
    words = line.split()
    state = words[0].upper()
    if state not in STATES or len(words) > 2:
        raise ValueError(f"the external status command printed {_quote_output(stdout)}; "
                         f"{expected}")
    if len(words) == 1:
        return state, None
    if state not in TERMINAL_STATES:
        raise ValueError(f"the external status command printed {_quote_output(stdout)}; "
                         f"only SUCCEEDED, FAILED and CANCELLED take an exit code")
    if not _INT.fullmatch(words[1]):
        raise ValueError(f"the external status command printed {_quote_output(stdout)}; "
                         f"the exit code after {state} must be an integer")
    return state, int(words[1])


def _count(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        value = int(value.strip())
    if not isinstance(value, int) or value < 0:
        raise ValueError
    return value


def _scalar(text: str) -> Any:
    text = text.strip()
    if _INT.fullmatch(text):
        return int(text)
    return text


def parse_capabilities(stdout: str, backend: str = NAME) -> BackendCapabilities:
    """What the capabilities command printed: a JSON object or ``key=value`` lines.

    Known keys: ``gpus``, ``nodes``, ``cpus``, ``memory_mb`` (non-negative integers),
    ``gpu_source`` (text) and ``partitions`` (a list, or names separated by commas); any
    other key is kept in ``details``. Raises ValueError with a clear message otherwise.
    """
    text = stdout.strip()
    if not text:
        raise ValueError("the capabilities command printed nothing; expected a JSON object "
                         "such as {\"gpus\": 2} or key=value lines such as gpus=2")
    data: dict[str, Any]
    if text.startswith("{") or text.startswith("["):
        try:
            loaded = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"the capabilities command printed invalid JSON ({exc}): "
                             f"{_quote_output(text)}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"the capabilities command printed JSON that is not an object: "
                             f"{_quote_output(text)}")
        data = loaded
    else:
        data = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"the capabilities command printed line {number} "
                                 f"{line[:200]!r}, not key=value (or a JSON object)")
            data[key.strip()] = _scalar(value)
    fields: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for key, value in data.items():
        if key in _COUNTS:
            if value is None:
                continue
            try:
                fields[key] = _count(value)
            except ValueError:
                raise ValueError(f"the capabilities command gave {key}={value!r}; "
                                 f"{key} must be a non-negative integer") from None
        elif key == "partitions":
            if isinstance(value, str):
                fields[key] = tuple(p.strip() for p in value.split(",") if p.strip())
            elif isinstance(value, list) and all(isinstance(p, str) for p in value):
                fields[key] = tuple(value)
            else:
                raise ValueError(f"the capabilities command gave partitions={value!r}; "
                                 "expected a list of names or names separated by commas")
        elif key == "gpu_source":
            fields[key] = str(value)
        elif key != "backend":
            details[key] = value
    if "gpu_source" not in fields:
        fields["gpu_source"] = ("backend_capabilities_cmd" if fields.get("gpus") is not None
                                else "unknown")
    return BackendCapabilities(backend, details=details, **fields)


def program_problem(argv: Sequence[str] | None, option: str) -> str | None:
    """Why the command of ``option`` cannot be run from here, or None when it can."""
    if not argv:
        return f"{option} is not configured"
    program = argv[0]
    if "/" in program:
        if not os.path.isfile(program):
            return f"{option}: {program} does not exist"
        if not os.access(program, os.X_OK):
            return f"{option}: {program} is not executable"
        return None
    if shutil.which(program) is None:
        return f"{option}: {program} is not on PATH"
    return None


# -- the executor -------------------------------------------------------------------------

@dataclass
class _Tracked:
    attempt_dir: Path
    backend_id: str | None
    status: Status
    submit_error: str | None = None
    state: str | None = None          # the last state the status command printed
    state_code: int | None = None     # the exit code it printed with it
    error: str | None = None          # why the status command's answer was not understood
    cancel_noted: bool = False
    pending_cancel: str | None = None  # a cancel the command did not take: retried each poll


class ExternalExecutor:
    """Runs attempts through the admin's submit/status/cancel commands.

    ``wrapper_path``: the installed step wrapper (``step.sh`` execs it at its backend path);
    ``artifacts_root``: where the cell's attempt directories live; ``transport`` runs the
    commands (local child processes by default); ``clock`` drives the poll rate, backoff
    and grace periods; ``log`` gets one line per notable event (stderr when None).
    """

    name = NAME
    delegated = True
    enforces_timeout = False

    def __init__(self, settings: Settings, *, wrapper_path: Path, artifacts_root: Path,
                 transport: Transport | None = None,
                 clock: Callable[[], float] = time.time, log: TextIO | None = None) -> None:
        self.settings = settings
        self.wrapper_path = wrapper_path
        self.artifacts_root = artifacts_root
        self.transport: Transport = transport if transport is not None else LocalTransport()
        self.clock = clock
        self.log = log
        self._tracked: dict[str, _Tracked] = {}
        self._missing = MissingClock(settings.backend_exit_code_grace_s)
        self._outage = Outage("external status command",
                              first_delay_s=settings.backend_poll_interval_s,
                              max_delay_s=max(settings.backend_poll_max_interval_s,
                                              settings.backend_poll_interval_s),
                              log=log)
        self._interval = settings.backend_poll_interval_s
        self._next_query = float("-inf")
        self._capabilities: BackendCapabilities | None = None
        self._capabilities_error = "not probed yet"
        self._capabilities_retry_at = float("-inf")

    # -- paths and capabilities
    def backend_path(self, attempt_dir: Path) -> str:
        return map_path(str(attempt_dir), self.settings.backend_path_mappings)

    def capabilities(self) -> BackendCapabilities:
        if self._capabilities is not None:
            return self._capabilities
        argv = self.settings.backend_capabilities_cmd
        if not argv:
            return BackendCapabilities(NAME, gpu_source="unknown")
        now = self.clock()
        if now >= self._capabilities_retry_at:
            try:
                result = self.transport.run(argv, timeout=CAPABILITIES_TIMEOUT_S)
                if not result.ok:
                    raise ValueError(result.describe())
                self._capabilities = parse_capabilities(result.stdout)
                return self._capabilities
            except (TransportError, ValueError) as exc:
                self._capabilities_error = str(exc)
            self._capabilities_retry_at = now + CAPABILITIES_RETRY_S
            self._write(f"backend_capabilities_cmd failed (retried in "
                        f"{CAPABILITIES_RETRY_S:g} s): {self._capabilities_error}")
        return BackendCapabilities(NAME, gpu_source="unknown",
                                   details={"error": self._capabilities_error})

    def usable(self) -> str | None:
        s = self.settings
        for option in ("external_submit_cmd", "external_status_cmd"):
            if not getattr(s, option):
                return f"{option} is not configured"
        if not isinstance(self.transport, LocalTransport):
            return None  # programs on the far side cannot be checked from here
        for option in ("external_submit_cmd", "external_status_cmd", "external_cancel_cmd",
                       "backend_capabilities_cmd"):
            argv = getattr(s, option)
            if argv:
                problem = program_problem(argv, option)
                if problem is not None:
                    return problem
        return None

    # -- submitting
    def submit(self, launches: list[Launch]) -> dict[str, str]:
        started: dict[str, str] = {}
        for launch in launches:
            backend_id = self._submit_one(launch)
            if backend_id is not None:
                started[launch.key] = backend_id
        if launches:
            self._interval = self.settings.backend_poll_interval_s
            self._next_query = min(self._next_query, self.clock() + self._interval)
        return started

    def _submit_one(self, launch: Launch) -> str | None:
        """Write the step script, run the submit command, record the id; None on failure
        (the attempt is tracked and its next poll says FAILED with the reason)."""
        backend_dir = launch.backend_dir or self.backend_path(launch.attempt_dir)
        argv = self.settings.external_submit_cmd
        try:
            if not argv:
                raise _SubmitFailed("external_submit_cmd is not configured")
            self._write_step_script(launch, backend_dir)
            env = submit_environment(launch, backend_dir=backend_dir,
                                     capabilities=self._known_capabilities())
            try:
                result = self.transport.run(argv, env=env, timeout=SUBMIT_TIMEOUT_S)
            except TransportError as exc:
                raise _SubmitFailed(str(exc)) from None
            if not result.ok:
                raise _SubmitFailed(result.describe())
            try:
                backend_id = parse_submit_output(result.stdout)
            except ValueError as exc:
                raise _SubmitFailed(str(exc)) from None
            record = BackendRecord(NAME, backend_id, self.clock(),
                                   script=env["JOBCELL_STEP_SCRIPT"],
                                   job_name=launch.job_name or None, backend_dir=backend_dir)
            try:
                write_record(launch.attempt_dir, record)
            except OSError as exc:
                # Unrecorded, the job could not be recovered by another worker: stop it.
                self._cancel(backend_id, "TERM")
                raise _SubmitFailed(f"submitted as {backend_id} but could not record it "
                                    f"({exc.strerror or exc}); cancelled it") from None
        except (_SubmitFailed, OSError, ValueError) as exc:
            reason = str(exc) if isinstance(exc, (_SubmitFailed, ValueError)) \
                else f"cannot write the step script: {exc.strerror or exc}"
            reason = f"external submit failed: {reason}"
            self._write(f"{launch.key}: {reason}")
            self._tracked[launch.key] = _Tracked(
                launch.attempt_dir, None, Status(Phase.FAILED, reason=reason),
                submit_error=reason)
            return None
        self._missing.seen(launch.key)
        self._tracked[launch.key] = _Tracked(launch.attempt_dir, backend_id,
                                             Status(Phase.RUNNING))
        return backend_id

    def _write_step_script(self, launch: Launch, backend_dir: str) -> None:
        unset = [name for name in os.environ if name.startswith("JOBCELL_")]
        text = step_script(launch, shell=self.settings.slurm_script_shell,
                           wrapper=self.backend_path(self.wrapper_path),
                           backend_dir=backend_dir, unset=unset)
        target = launch.attempt_dir / STEP_SCRIPT
        tmp = target.with_name(f".{STEP_SCRIPT}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o755)
        os.replace(tmp, target)

    def _known_capabilities(self) -> BackendCapabilities | None:
        if not self.settings.backend_capabilities_cmd:
            return None
        capabilities = self.capabilities()
        return capabilities if self._capabilities is not None else None

    def adopt(self, key: str, attempt_dir: Path, backend_id: str | None) -> None:
        if backend_id is None:
            record = read_record(attempt_dir)
            if record is not None:
                backend_id = record.backend_id
        self._tracked[key] = _Tracked(attempt_dir, backend_id, Status(Phase.RUNNING))
        self._next_query = float("-inf")  # ask about it in the next round

    def tracked(self) -> set[str]:
        """Keys of the attempts this executor is watching."""
        return set(self._tracked)

    def last_error(self, key: str) -> str | None:
        """Why the status command's latest answer about ``key`` was not understood (the
        step stays UNKNOWN meanwhile); None once it answers sensibly again."""
        item = self._tracked.get(key)
        return item.error if item is not None else None

    # -- polling
    def poll(self) -> dict[str, Status]:
        now = self.clock()
        query: list[str] = []
        for key, item in self._tracked.items():
            if item.submit_error is not None:
                continue
            code = self._exit_code(item)
            if item.pending_cancel is not None and item.backend_id is not None and (
                    code is not None or self._cancel(item.backend_id, item.pending_cancel)):
                item.pending_cancel = None
            if code is not None:
                self._missing.seen(key)
                item.error = None
                item.status = Status(Phase.EXITED, code)
            elif item.backend_id is None:
                # Adopted without a recorded submission: it never reached the backend.
                item.status = Status(Phase.INTERRUPTED) if self._missing.expired(key, now) \
                    else Status(Phase.RUNNING)
            elif item.status.phase in (Phase.RUNNING, Phase.UNKNOWN):
                query.append(key)
        if query and now >= self._next_query and self._outage.may_try(now):
            changed = self._query(query, now)
            if changed:
                self._interval = self.settings.backend_poll_interval_s
            else:
                self._interval = min(self._interval * 2,
                                     self.settings.backend_poll_max_interval_s)
            self._next_query = now + self._interval
        return {key: item.status for key, item in self._tracked.items()}

    @staticmethod
    def _exit_code(item: _Tracked) -> int | None:
        try:
            return parse_exit_code((item.attempt_dir / "exit_code").read_bytes())
        except OSError:
            return None

    def _query(self, keys: list[str], now: float) -> bool:
        """One status round; True when some answer changed."""
        argv = self.settings.external_status_cmd
        changed = False
        failure: str | None = None
        unreachable: str | None = None if argv else "external_status_cmd is not configured"
        for key in keys:
            item = self._tracked[key]
            if unreachable is not None or item.backend_id is None:
                # The backend cannot be reached: the rest of this round would fail the same.
                failure = failure or unreachable
                item.status = Status(Phase.UNKNOWN, reason=unreachable)
                continue
            try:
                result: CommandResult = self.transport.run([*argv, item.backend_id],
                                                           timeout=STATUS_TIMEOUT_S)
            except TransportError as exc:
                unreachable = failure = str(exc)
                item.status = Status(Phase.UNKNOWN, reason=unreachable)
                continue
            if not result.ok:
                failure = failure or result.describe()
                item.status = Status(Phase.UNKNOWN, reason=result.describe())
                continue
            try:
                state, code = parse_status_output(result.stdout)
            except ValueError as exc:
                message = f"backend job {item.backend_id}: {exc}"
                if message != item.error:
                    self._write(f"{key}: {message}")
                item.error = message
                item.status = Status(Phase.UNKNOWN, reason=message)
                continue
            item.error = None
            if (state, code) != (item.state, item.state_code):
                changed = True
            item.state, item.state_code = state, code
            item.status = self._judge(key, item, state, code, now)
        if failure is not None:
            self._outage.failed(now, failure)
        else:
            self._outage.succeeded(now)
        return changed

    def _judge(self, key: str, item: _Tracked, state: str, code: int | None,
               now: float) -> Status:
        """What a parsed status means for an attempt that has no ``exit_code`` (yet)."""
        if state in ("RUNNING", "PENDING"):
            self._missing.seen(key)
            return Status(Phase.RUNNING)
        started = (item.attempt_dir / "child.pid").exists()
        if state == "CANCELLED" and not started:
            return Status(Phase.FAILED, reason="cancelled by the backend")
        if not self._missing.expired(key, now):
            return Status(Phase.RUNNING)  # the exit_code may still be on its way
        if state == "CANCELLED":
            return Status(Phase.FAILED, reason="cancelled by the backend")
        if state == "SUCCEEDED":
            return Status(Phase.INTERRUPTED, reason="the backend reports SUCCEEDED but the "
                                                    "step wrote no exit_code")
        said = f"FAILED (exit code {code})" if code is not None else "FAILED"
        return Status(Phase.FAILED, reason=f"the backend reports {said} and the step wrote "
                                           "no exit_code", oom_like=code in OOM_CODES)

    # -- stopping
    def terminate(self, key: str, force: bool = False) -> None:
        item = self._tracked.get(key)
        if item is None or item.backend_id is None or item.submit_error is not None:
            return
        if item.status.phase not in (Phase.RUNNING, Phase.UNKNOWN):
            return
        if not self.settings.external_cancel_cmd:
            if not item.cancel_noted:
                item.cancel_noted = True
                self._write(f"{key}: cannot cancel backend job {item.backend_id}: "
                            "external_cancel_cmd is not configured")
            return
        signal_name = "KILL" if force else "TERM"
        item.pending_cancel = None if self._cancel(item.backend_id, signal_name) \
            else signal_name

    def _cancel(self, backend_id: str, signal_name: str) -> bool:
        """Run the cancel command; False when it did not take the cancel."""
        argv = self.settings.external_cancel_cmd
        if not argv:
            return True
        try:
            result = self.transport.run([*argv, backend_id], timeout=CANCEL_TIMEOUT_S,
                                        env={"JOBCELL_CANCEL_SIGNAL": signal_name})
        except TransportError as exc:
            self._write(f"cancelling backend job {backend_id} failed: {exc}; retrying")
            return False
        if not result.ok:
            self._write(f"cancelling backend job {backend_id} failed: {result.describe()}; "
                        "retrying")
            return False
        return True

    def forget(self, key: str) -> None:
        self._tracked.pop(key, None)
        self._missing.seen(key)

    def wait(self, timeout: float, wake_fds: Sequence[int] = ()) -> None:
        if wake_fds:
            select.select(list(wake_fds), [], [], max(0.0, timeout))
        elif timeout > 0:
            time.sleep(timeout)

    def close(self) -> None:
        self.transport.close()

    def _write(self, line: str) -> None:
        print(f"external executor: {line}", file=self.log or sys.stderr, flush=True)


class _SubmitFailed(Exception):
    """The submit command did not give a usable backend id."""
