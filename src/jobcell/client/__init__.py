"""The Python task client: awaitable task functions, configuration scopes, a client-side
execution cache that makes re-running a script re-attach, callbacks and backends."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jobcell.client.backends import (
    Backend,
    ExecutionRequest,
    ExecutionResult,
    ExecutionStatus,
    LocalBackend,
    TaskDefinition,
    TaskRegistrationError,
)
from jobcell.client.callbacks import EVENTS, Callback
from jobcell.client.config import (
    CacheConfiguration,
    CacheConfigurationChained,
    CacheConfigurationShelve,
    CacheConfigurationSQLite,
    CacheMode,
    TaskConfig,
    current_config,
    global_config,
    scoped_config,
)
from jobcell.client.task import (
    DecoratedTask,
    SubmissionsDisabled,
    TaskDefinitionError,
    TaskError,
    TaskFailed,
    TaskFunction,
    TaskOutputError,
    task,
    task_client,
)
from jobcell.fileref import FileRef, FileRefError

if TYPE_CHECKING:
    from jobcell.client.rest import RestBackend
    from jobcell.client.slurm import SlurmBackend


def __getattr__(name: str) -> Any:
    # Lazy: a task module imports this package in every runner's child interpreter,
    # which should not pay for httpx and asyncssh.
    if name == "RestBackend":
        from jobcell.client.rest import RestBackend

        return RestBackend
    if name == "SlurmBackend":
        from jobcell.client.slurm import SlurmBackend

        return SlurmBackend
    raise AttributeError(f"module 'jobcell.client' has no attribute {name!r}")

__all__ = [
    "EVENTS", "Backend", "CacheConfiguration", "CacheConfigurationChained",
    "CacheConfigurationSQLite", "CacheConfigurationShelve", "CacheMode", "Callback",
    "DecoratedTask", "ExecutionRequest", "ExecutionResult", "ExecutionStatus", "FileRef",
    "FileRefError",
    "LocalBackend", "RestBackend", "SlurmBackend", "SubmissionsDisabled", "TaskConfig",
    "TaskDefinition",
    "TaskDefinitionError", "TaskError", "TaskFailed", "TaskFunction", "TaskOutputError",
    "TaskRegistrationError", "current_config", "global_config", "scoped_config", "task",
    "task_client",
]
