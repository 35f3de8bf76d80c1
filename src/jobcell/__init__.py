"""jobcell: a durable job runtime for scientific computing."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def register_runner(definition: Any, *, home: Any = None, name: str | None = None,
                    overwrite: bool = True, **fields: Any) -> Any:
    """Register a runner in a cell (a dict of YAML fields, or a module-level function)."""
    from jobcell.service import Cell

    with Cell(home, auto_worker=False) as cell:
        return cell.register_runner(definition, name=name, overwrite=overwrite, **fields)


def __getattr__(name: str) -> Any:
    # Lazy so that ``python -m jobcell.pyrunner`` stays cheap to start.
    if name == "Cell":
        from jobcell.service import Cell

        return Cell
    if name == "StepContext":
        from jobcell.pyrunner import StepContext

        return StepContext
    if name == "FileRef":
        from jobcell.fileref import FileRef

        return FileRef
    if name in ("task", "task_client", "TaskFailed"):
        import jobcell.client

        return getattr(jobcell.client, name)
    raise AttributeError(name)


__all__ = ["Cell", "FileRef", "StepContext", "TaskFailed", "__version__", "register_runner", "task",
           "task_client"]
