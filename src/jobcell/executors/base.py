"""The executor interface every backend implements.

An executor starts attempts (each one the step wrapper in its attempt directory), polls
all of them in one round, stops them and says what its backend can do. It never touches
the store: the worker records what it reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

BACKENDS = ("embedded", "slurm", "external")


class Phase(StrEnum):
    """What a status query said about one launched attempt."""

    RUNNING = "running"
    EXITED = "exited"            # exit_code was written: ``exit_code`` holds it
    INTERRUPTED = "interrupted"  # no exit_code and nothing alive: requeue, never success
    FAILED = "failed"            # the backend ended it without an exit_code: ``reason`` says why
    UNKNOWN = "unknown"          # the status query itself failed: keep waiting


@dataclass(frozen=True)
class StepResources:
    """What one attempt asks its backend for."""

    cpu_slots: int = 1
    memory_mb: int = 256
    gpus: int = 0              # required devices
    optional_gpus: int = 0     # taken when the backend has them
    timeout_s: float = 3600.0


@dataclass(frozen=True)
class Launch:
    """One attempt to start: its directory, argv (never a shell string) and environment.

    ``env`` is the full environment of a local process; ``exports`` is the part jobcell
    sets itself (the runner's ``env``, ``JOBCELL_*``, GPU variables), which a backend that
    does not inherit the worker's environment (Slurm over SSH) exports in its script.
    ``backend_dir`` is ``attempt_dir`` as the backend sees it (path mappings applied);
    ``argv`` already uses backend paths.
    """

    key: str
    attempt_dir: Path
    argv: tuple[str, ...]
    env: dict[str, str]
    exports: dict[str, str] = field(default_factory=dict)
    runner: str = ""
    resources: StepResources = field(default_factory=StepResources)
    job_name: str = ""
    backend_dir: str = ""

    @property
    def remote_dir(self) -> str:
        """The attempt directory on the backend's side."""
        return self.backend_dir or str(self.attempt_dir)


@dataclass(frozen=True)
class Status:
    """The outcome of polling one attempt.

    ``reason`` explains an end the exit code alone does not (a Slurm ``TIMEOUT``); an
    ``oom_like`` end (Slurm ``OUT_OF_MEMORY``) cools the runner's group down like exit 137.
    """

    phase: Phase
    exit_code: int | None = None
    reason: str | None = None
    oom_like: bool = False


@dataclass(frozen=True)
class BackendCapabilities:
    """What a backend reported about itself; ``None`` where it could not tell."""

    backend: str
    gpus: int | None = None
    gpu_source: str = "unknown"
    partitions: tuple[str, ...] = ()
    nodes: int | None = None
    cpus: int | None = None
    memory_mb: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "gpus": self.gpus, "gpu_source": self.gpu_source,
                "partitions": list(self.partitions), "nodes": self.nodes, "cpus": self.cpus,
                "memory_mb": self.memory_mb, **self.details}


class Executor(Protocol):
    """Start attempts, poll them all in one round, stop them."""

    name: str
    #: True when steps run elsewhere (Slurm, a site gateway): the cell's own CPU, memory and
    #: GPU leases do not bound them; the backend queues them.
    delegated: bool
    #: True when the backend stops an attempt at its ``timeout_s`` itself (Slurm's
    #: ``--time``, counted from when the job really starts, not while it is queued).
    enforces_timeout: bool

    def backend_path(self, attempt_dir: Path) -> str:
        """Where the backend sees an attempt directory (path mappings, staging area)."""
        ...

    def submit(self, launches: list[Launch]) -> dict[str, str]:
        """Start every launch (in as few backend calls as it can); return key -> backend
        id (a PID for embedded). A launch missing from the answer could not be started;
        the executor still tracks it, and its next poll reports how it ended."""
        ...

    def adopt(self, key: str, attempt_dir: Path, backend_id: str | None) -> None:
        """Track an attempt started by an earlier worker (``backend_id`` as recorded, or
        None when the worker died before recording it)."""
        ...

    def poll(self) -> dict[str, Status]:
        """The status of every tracked attempt, in one round."""
        ...

    def terminate(self, key: str, force: bool = False) -> None:
        """Ask an attempt to stop (TERM), or kill it (KILL) when ``force``."""
        ...

    def forget(self, key: str) -> None:
        """Stop tracking an attempt whose end has been recorded."""
        ...

    def wait(self, timeout: float, wake_fds: Sequence[int] = ()) -> None:
        """Block until some tracked attempt may have changed, one of ``wake_fds`` is
        readable, or ``timeout`` passes."""
        ...

    def capabilities(self) -> BackendCapabilities:
        """What the backend offers (GPUs, partitions, nodes), probed on first use."""
        ...

    def usable(self) -> str | None:
        """None when the backend can be used from here, else why not (one sentence)."""
        ...

    def close(self) -> None:
        """Release connections and descriptors; the attempts themselves go on."""
        ...
