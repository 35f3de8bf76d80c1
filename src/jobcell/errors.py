"""Errors users see. Each carries one clear sentence: what was wrong, and where."""

from __future__ import annotations


class JobcellError(Exception):
    """Base class for every error jobcell reports to a user."""

    exit_code = 1


class ConfigError(JobcellError):
    """A configuration value or the cell home is unusable."""


class RunnerDefinitionError(JobcellError):
    """A runner definition is invalid (names the file, the field and the problem)."""


class SpecError(JobcellError):
    """A job spec is invalid (names the field and the problem)."""


class NotFoundError(JobcellError):
    """A job, step or runner does not exist."""


class DuplicateError(JobcellError):
    """Something with that name already exists."""


class QuotaError(JobcellError):
    """Submitting would exceed a configured quota."""


class WorkerError(JobcellError):
    """The worker could not be started, stopped or reached."""


def describe_yaml_error(exc: Exception) -> str:
    """'not valid YAML at line N: the parser's reason' for a PyYAML error."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None)
    return f"not valid YAML{where}" + (f": {problem}" if problem else "")
