"""The runner registry: runner YAML files (one runner a file) and Python registrations."""

from __future__ import annotations

import inspect
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from jobcell.errors import RunnerDefinitionError, describe_yaml_error
from jobcell.model.runner import RunnerDefinition, check_name
from jobcell.model.validation import describe_validation_error

RUNNER_SUFFIXES = (".yaml", ".yml")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RunnerDefinitionError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise RunnerDefinitionError(f"{path}: not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RunnerDefinitionError(f"{path}: {describe_yaml_error(exc)}") from None
    if not isinstance(data, dict):
        raise RunnerDefinitionError(f"{path}: a runner file must hold one mapping (one runner)")
    return data


def _resolve_command(command: str, runner_dir: Path, path_env: str | None) -> str | None:
    if os.sep in command:
        candidate = Path(command) if os.path.isabs(command) else runner_dir / command
        return str(candidate.resolve()) if os.access(candidate, os.X_OK) else None
    found = shutil.which(command, path=path_env)
    return str(Path(found).absolute()) if found else None


def finalize(data: dict[str, Any], runner_dir: Path, source: str) -> RunnerDefinition:
    """Validate raw runner data and resolve what depends on this machine.

    The command is resolved on PATH and its absolute path recorded; relative
    ``python_path`` entries are taken from the runner's folder.
    """
    data = {k: v for k, v in data.items() if k not in ("runner_dir", "command_path", "source")}
    try:
        runner = RunnerDefinition.model_validate(
            {**data, "runner_dir": str(runner_dir), "source": source})
    except ValidationError as exc:
        raise RunnerDefinitionError(describe_validation_error(exc, source)) from None
    if runner.python is not None:
        paths = [str((runner_dir / p).resolve()) for p in runner.python_path]
        return runner.model_copy(update={"command_path": sys.executable, "python_path": paths})
    if runner.container is not None:
        return runner  # its command lives in the image, not on this host
    assert runner.command is not None
    resolved = _resolve_command(runner.command, runner_dir, os.environ.get("PATH"))
    if resolved is None:
        raise RunnerDefinitionError(
            f"{source}: field 'command': {runner.command!r} was not found on PATH "
            "or is not executable")
    return runner.model_copy(update={"command_path": resolved})


def load_runner_file(path: str | os.PathLike[str]) -> RunnerDefinition:
    """Load and validate one runner YAML file."""
    file = Path(path).absolute()
    return finalize(_read_yaml(file), file.parent, str(file))


@dataclass
class _Entry:
    stamp: tuple[int, int, int]
    runner: RunnerDefinition | None
    error: str | None


@dataclass
class RunnerRegistry:
    """Runners from ``<home>/runners`` and ``runner_registry_paths``, re-read when files change."""

    paths: list[Path]
    autosync: bool = True
    errors: dict[str, str] = field(default_factory=dict)
    _entries: dict[Path, _Entry] = field(default_factory=dict)
    _runners: dict[str, RunnerDefinition] | None = None

    def runners(self) -> dict[str, RunnerDefinition]:
        """Every valid runner by name (re-scanned on each call when autosync is on)."""
        if self._runners is None or self.autosync:
            self.refresh()
        assert self._runners is not None
        return self._runners

    def get(self, name: str) -> RunnerDefinition | None:
        """The runner called ``name``, or None."""
        return self.runners().get(name)

    def _files(self) -> Iterable[Path]:
        for base in self.paths:
            if base.is_file():
                yield base.absolute()
            elif base.is_dir():
                for child in sorted(base.iterdir()):
                    if child.suffix in RUNNER_SUFFIXES and child.is_file():
                        yield child.absolute()

    def refresh(self) -> bool:
        """Re-read added or changed files; returns whether anything changed."""
        changed = False
        seen: dict[Path, _Entry] = {}
        for file in self._files():
            try:
                st = file.stat()
            except FileNotFoundError:
                continue
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            entry = self._entries.get(file)
            if entry is None or entry.stamp != stamp:
                changed = True
                try:
                    entry = _Entry(stamp, load_runner_file(file), None)
                except RunnerDefinitionError as exc:
                    entry = _Entry(stamp, None, str(exc))
            seen[file] = entry
        changed = changed or set(seen) != set(self._entries)
        self._entries = seen
        if changed or self._runners is None:
            self._rebuild()
        return changed

    def _rebuild(self) -> None:
        runners: dict[str, RunnerDefinition] = {}
        errors: dict[str, str] = {}
        for file, entry in self._entries.items():
            if entry.runner is None:
                errors[str(file)] = entry.error or "invalid"
                continue
            name = entry.runner.name
            if name in runners:
                errors[str(file)] = (f"{file}: runner name {name!r} is already defined in "
                                     f"{runners[name].source}")
                continue
            runners[name] = entry.runner
        self._runners, self.errors = runners, errors


def write_runner(runners_dir: Path, data: dict[str, Any], overwrite: bool = True) -> Path:
    """Validate ``data`` and write it atomically as ``<runners_dir>/<name>.yaml``."""
    name = data.get("name")
    if not isinstance(name, str):
        raise RunnerDefinitionError("a runner needs a 'name'")
    try:
        check_name(name, "runner name")
    except ValueError as exc:
        raise RunnerDefinitionError(str(exc)) from None
    target = runners_dir / f"{name}.yaml"
    finalize(data, runners_dir, str(target))
    if target.exists() and not overwrite:
        raise RunnerDefinitionError(f"runner {name!r} already exists at {target}")
    fd, tmp = tempfile.mkstemp(dir=runners_dir, prefix=f".{name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        yaml.safe_dump(data, handle, sort_keys=False)
    os.replace(tmp, target)
    return target


def callable_runner_data(function: Callable[..., Any], name: str | None = None,
                         **fields: Any) -> dict[str, Any]:
    """Runner data for a Python function defined in an importable module."""
    module = inspect.getmodule(function)
    if module is None or module.__name__ == "__main__" or not getattr(module, "__file__", None):
        raise RunnerDefinitionError(
            f"{getattr(function, '__qualname__', function)!r} must be defined in an importable "
            "module (not __main__) to run in a child interpreter")
    qualname = function.__qualname__
    if "." in qualname:
        raise RunnerDefinitionError(f"{qualname!r} must be a module-level function")
    depth = module.__name__.count(".") + (1 if Path(module.__file__).stem == "__init__" else 0)
    root = Path(module.__file__).resolve().parents[depth]
    data: dict[str, Any] = {"name": name or function.__name__,
                            "python": f"{module.__name__}:{qualname}",
                            "python_path": [str(root)]}
    data.update(fields)
    return data
