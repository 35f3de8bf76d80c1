"""Task client backends: where executions run. ``LocalBackend`` is a local cell.

A backend registers task runners, submits executions, reports their status and
fetches their results. Its methods are coroutines; the local backend runs the
blocking :class:`jobcell.service.Cell` calls in worker threads, so awaiting many
tasks never blocks the event loop.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from jobcell.errors import JobcellError, NotFoundError
from jobcell.fileref import FileRef

if TYPE_CHECKING:
    from jobcell.service import Cell

logger = logging.getLogger("jobcell.client")
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
T = TypeVar("T")


@dataclass
class ExecutionRequest:
    """One task execution as the callbacks see it."""

    task_name: str
    task_version: str
    input: dict[str, Any]
    provisioning: dict[str, Any]
    label: str
    cache_key: str
    execution_id: str | None = None
    state: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    # Files given as input, by the name they are staged under (the param's value).
    files: dict[str, FileRef] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskDefinition:
    """What a backend needs to register a task's runner (``function`` None: the runner
    is registered elsewhere, e.g. from YAML)."""

    name: str
    version: str
    function: Callable[..., Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    python: str | None = None
    returns: Any = None     # the return annotation the output is checked against


@dataclass(frozen=True)
class ExecutionStatus:
    """The backend's state of one execution (queued, running, succeeded, failed,
    cancelled) and its progress counts."""

    execution_id: str
    state: str
    progress: dict[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass(frozen=True)
class ExecutionResult:
    """A finished execution: its output value, or its error and log tail."""

    execution_id: str
    state: str
    output: Any = None
    error: str | None = None
    log_tail: list[str] = field(default_factory=list)
    # The task step's output files by name (what file markers in ``output`` name).
    files: dict[str, FileRef] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """What the task client needs from a backend."""

    poll_interval_s: float
    max_poll_interval_s: float

    @property
    def identity(self) -> str:
        """A stable name of where executions live (cache entries name it)."""
        ...

    async def initialize(self) -> bool:
        """Connect; True the first time (the ``backend_initialized`` event)."""
        ...

    async def ensure_task(self, definition: TaskDefinition) -> None:
        """Register the task's runner if this backend registers runners."""
        ...

    async def stage_files(self, files: dict[str, FileRef]) -> dict[str, str]:
        """Put input files where the backend's jobs can name them (uploads of the
        submitting owner); returns each name's BLAKE3 digest."""
        ...

    async def submit(self, request: ExecutionRequest, *, fresh: bool) -> tuple[str, bool]:
        """Submit (staging ``request.files`` first); returns (execution id, whether an
        identical execution was reused). ``fresh``: do not reuse earlier executions (the
        cache mode asks for new work)."""
        ...

    async def status(self, execution_id: str) -> ExecutionStatus | None:
        """The execution's status, or None when the backend does not know it."""
        ...

    async def result(self, execution_id: str) -> ExecutionResult:
        """The outcome of a finished execution."""
        ...

    async def cancel(self, execution_id: str) -> None:
        """Ask the backend to cancel the execution."""
        ...


TASK_STEP = "task"


def node_resources(provisioning: dict[str, Any]) -> dict[str, Any]:
    """The step's resource override from the client's provisioning (``vcpu`` rounds up
    to whole CPU slots)."""
    resources: dict[str, Any] = {}
    if provisioning.get("vcpu") is not None:
        resources["cpu_slots"] = max(1, math.ceil(provisioning["vcpu"]))
    if provisioning.get("memory_mb") is not None:
        resources["memory_mb"] = int(provisioning["memory_mb"])
    if provisioning.get("gpu") is not None:
        resources["gpus"] = int(provisioning["gpu"])
    if provisioning.get("timeout_s") is not None:
        resources["timeout_s"] = float(provisioning["timeout_s"])
    return resources


def execution_spec(request: ExecutionRequest, *, fresh: bool,
                   digests: dict[str, str]) -> dict[str, Any]:
    """The job spec of one execution: one step named ``task``."""
    step: dict[str, Any] = {"id": TASK_STEP, "runner": request.task_name,
                            "params": request.input}
    if digests:
        step["files"] = digests
    resources = node_resources(request.provisioning)
    if resources:
        step["resources"] = resources
    return {"label": request.label, "cache": not fresh, "steps": [step]}


class LocalBackend:
    """A local cell (``home``; default: ``$JOBCELL_HOME`` or the user's cell) whose
    embedded worker is started on demand. Cheap to construct: the cell is opened on
    first use (so task modules imported by runners may configure it at the top)."""

    def __init__(self, home: str | os.PathLike[str] | None = None, *,
                 poll_interval_s: float = 0.05, max_poll_interval_s: float = 1.0,
                 owner: str | None = None) -> None:
        self.home = home
        self.poll_interval_s = poll_interval_s
        self.max_poll_interval_s = max_poll_interval_s
        self.owner = owner
        self._cell: Cell | None = None
        self._lock = threading.RLock()
        self._registered: dict[str, Any] = {}
        self._worker_checked = 0.0

    def __repr__(self) -> str:
        return f"LocalBackend(home={self.home!r})"

    @property
    def cell(self) -> Cell:
        """The opened cell."""
        with self._lock:
            if self._cell is None:
                from jobcell.service import Cell

                self._cell = Cell(self.home)
            return self._cell

    @property
    def identity(self) -> str:
        return f"local:{self.cell.home.root}"

    def close(self) -> None:
        """Close the cell's database connection (the worker and jobs go on)."""
        with self._lock:
            if self._cell is not None:
                self._cell.close()
                self._cell = None

    async def _call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        import asyncio

        def locked() -> T:
            with self._lock:
                return function(*args, **kwargs)
        return await asyncio.to_thread(locked)

    async def initialize(self) -> bool:
        if self._cell is not None:
            return False        # opened already: no thread hop on every call

        def open_cell() -> bool:
            first = self._cell is None
            _ = self.cell
            return first
        return await self._call(open_cell)

    async def ensure_task(self, definition: TaskDefinition) -> None:
        if definition.function is None:
            return
        data = _runner_data(definition)
        if self._registered.get(definition.name) == data:
            return
        await self._call(self._register, definition, data)

    def _register(self, definition: TaskDefinition, data: dict[str, Any]) -> None:
        existing = self.cell.registry.get(definition.name)
        if existing is not None:
            same = (existing.python == data["python"] and existing.version == data["version"]
                    and existing.params == _params_models(data["params"])
                    and existing.resources.model_dump() == _resources(data)
                    and existing.python_path == data["python_path"])
            if same:
                self._registered[definition.name] = data
                return
            other = existing.python.partition(":")[0] if existing.python else None
            mine = data["python"].partition(":")[0]
            if other != mine:
                raise TaskRegistrationError(
                    f"the cell at {self.cell.home.root} already has a runner named "
                    f"{definition.name!r} ({existing.python or existing.command}); give the "
                    f"task another name: @task(name=...)")
        self.cell.register_runner(data)
        self._registered[definition.name] = data

    async def stage_files(self, files: dict[str, FileRef]) -> dict[str, str]:
        root = Path(self.cell.home.root)

        def stage(ref: FileRef) -> str:
            if ref.execution_id and ref.step and ref.path and \
                    Path(ref.path).is_relative_to(root):
                try:
                    answer = self.cell.upload_output(ref.execution_id, ref.step, ref.name,
                                                     owner=self.owner)
                    return str(answer["digest"])
                except NotFoundError:
                    pass        # not this owner's (or no longer an output): copy the bytes
            return str(self.cell.upload(ref.chunks(), owner=self.owner)["digest"])
        return {name: await self._call(stage, ref) for name, ref in files.items()}

    async def submit(self, request: ExecutionRequest, *, fresh: bool) -> tuple[str, bool]:
        digests = await self.stage_files(request.files)
        spec = execution_spec(request, fresh=fresh, digests=digests)
        answer = await self._call(self.cell.submit, spec, owner=self.owner, dedup=not fresh)
        self._worker_checked = time.monotonic()
        return answer.job_id, answer.deduplicated

    async def status(self, execution_id: str) -> ExecutionStatus | None:
        def query() -> ExecutionStatus | None:
            try:
                status = self.cell.status(execution_id, owner=self.owner)
            except NotFoundError:
                return None
            if status["state"] not in TERMINAL_STATES and \
                    time.monotonic() - self._worker_checked > 2.0:
                # A re-attaching script may find no worker (it idled out, or died):
                # start one, as Cell.wait does.
                self._worker_checked = time.monotonic()
                if self.cell.auto_worker:
                    self.cell.ensure_worker()
            return ExecutionStatus(execution_id, status["state"], status["progress"])
        return await self._call(query)

    async def result(self, execution_id: str) -> ExecutionResult:
        def fetch() -> ExecutionResult:
            answer = self.cell.result(execution_id, owner=self.owner)
            if answer["state"] == "succeeded":
                files = {o["name"]: FileRef(name=o["name"], path=o["path"],
                                            execution_id=execution_id, step=o["step"],
                                            digest=o["blake3"], size=o["size"])
                         for o in self.cell.outputs(execution_id, owner=self.owner)
                         if o["step"] == TASK_STEP}
                return ExecutionResult(execution_id, "succeeded", answer["result"],
                                       files=files)
            job = self.cell.status(execution_id, owner=self.owner)
            errors = [s["error"] for s in job["steps"] if s.get("error")]
            logs = self.cell.logs(execution_id, last_n=20, owner=self.owner)
            tail = [line for step in logs["steps"]
                    for line in (*step["stderr"], *step["stdout"])]
            return ExecutionResult(execution_id, answer["state"], None,
                                   answer["error"] or "; ".join(errors) or answer["state"],
                                   tail)
        return await self._call(fetch)

    async def cancel(self, execution_id: str) -> None:
        await self._call(self.cell.cancel, execution_id, owner=self.owner)


class TaskRegistrationError(JobcellError):
    """A task's runner cannot be registered (a name clash, a bad definition)."""


def _params_models(params: dict[str, Any]) -> dict[str, Any]:
    from jobcell.model.params import ParamSpec

    return {name: ParamSpec.model_validate(spec) for name, spec in params.items()}


def _resources(data: dict[str, Any]) -> dict[str, Any]:
    from jobcell.model.runner import Resources

    return Resources.model_validate(data.get("resources", {})).model_dump()


def _runner_data(definition: TaskDefinition) -> dict[str, Any]:
    from jobcell.registry import callable_runner_data

    assert definition.function is not None
    fields: dict[str, Any] = {"version": definition.version, "params": definition.params,
                              "resources": definition.resources}
    if definition.python:
        fields["python"] = definition.python
    return callable_runner_data(definition.function, definition.name, **fields)
