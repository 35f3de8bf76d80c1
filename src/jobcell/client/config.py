"""Task client configuration: ``global_config`` and ``scoped_config``.

``global_config`` holds the backend, the cache storage and mode, throttling,
provisioning and the callbacks. ``scoped_config(**shortcuts)`` copies the current
configuration, applies the shortcuts, and makes the copy current inside the
``with`` block. The current configuration lives in a context variable, so scopes
nest (the innermost wins, the outer one is restored on exit) and follow asyncio
tasks: concurrent tasks in different scopes don't mix.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import math
import os
import sys
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobcell.client.callbacks import Callbacks

if TYPE_CHECKING:
    from jobcell.client.backends import Backend
    from jobcell.client.cache import CacheStorage

DEFAULT_CACHE_STEM = ".jobcell-cache"


class CacheMode(enum.Enum):
    """How the client-side cache is used (see the task client documentation)."""

    FULLY_CACHED = "fully_cached"      # use submitted and finished executions; write
    RESTART_FAILED = "restart_failed"  # use submitted and succeeded, not failed; write
    REATTACH_ONLY = "reattach_only"    # use only submitted (still running); write
    WRITE_ONLY = "write_only"          # never use the cache, but write to it
    DISABLED = "disabled"              # neither use nor write


def default_cache_dir() -> Path:
    """The folder of the running script, or the working directory (notebooks, REPL)."""
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    if script and not hasattr(sys, "ps1"):
        return Path(script).resolve().parent
    return Path.cwd()


class CacheConfiguration:
    """Base of the cache storage configurations; ``mode`` is the :class:`CacheMode`."""

    def __init__(self, mode: CacheMode = CacheMode.FULLY_CACHED) -> None:
        self.mode = CacheMode(mode)

    def storage(self) -> CacheStorage:
        """The opened storage (shared by every configuration naming the same file)."""
        raise NotImplementedError

    def copy(self) -> CacheConfiguration:
        """A copy whose ``mode`` can change without touching this one."""
        return copy.copy(self)


class _FileCache(CacheConfiguration):
    suffix = ""

    def __init__(self, file: str | os.PathLike[str] | None = None,
                 mode: CacheMode = CacheMode.FULLY_CACHED) -> None:
        super().__init__(mode)
        self.file = file

    @property
    def path(self) -> Path:
        """The cache file: ``file``, or ``.jobcell-cache.<suffix>`` next to the script."""
        if self.file is not None:
            return Path(self.file).expanduser().resolve()
        return default_cache_dir() / f"{DEFAULT_CACHE_STEM}.{self.suffix}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(file={self.file!r}, mode={self.mode})"


class CacheConfigurationSQLite(_FileCache):
    """A SQLite database file (the default: ``.jobcell-cache.sqlite`` next to the script)."""

    suffix = "sqlite"

    def storage(self) -> CacheStorage:
        from jobcell.client.cache import open_sqlite

        return open_sqlite(self.path)


class CacheConfigurationShelve(_FileCache):
    """A :mod:`shelve` file (default: ``.jobcell-cache.shelve`` next to the script)."""

    suffix = "shelve"

    def storage(self) -> CacheStorage:
        from jobcell.client.cache import open_shelve

        return open_shelve(self.path)


class CacheConfigurationChained(CacheConfiguration):
    """Several caches in order: a hit in a later one is written back to the first."""

    def __init__(self, caches: Sequence[CacheConfiguration],
                 mode: CacheMode = CacheMode.FULLY_CACHED) -> None:
        super().__init__(mode)
        if not caches:
            raise ValueError("CacheConfigurationChained needs at least one cache")
        self.caches = list(caches)

    def storage(self) -> CacheStorage:
        from jobcell.client.cache import ChainedStorage

        return ChainedStorage([c.storage() for c in self.caches])

    def __repr__(self) -> str:
        return f"CacheConfigurationChained(caches={self.caches!r}, mode={self.mode})"


@dataclass
class Hardware:
    """``vcpu`` (CPU shares), ``memory`` (MiB), ``gpu`` (cards); None: the task's own."""

    vcpu: float | None = None
    memory: int | None = None
    gpu: int | None = None


@dataclass
class Provisioning:
    """Per-execution resources; not part of the cache key."""

    hardware: Hardware = field(default_factory=Hardware)
    timeout: timedelta | None = None

    def to_dict(self) -> dict[str, Any]:
        """The set values: ``vcpu``, ``memory_mb``, ``gpu``, ``timeout_s`` (checked: a
        :class:`ValueError` names the setting a backend would refuse)."""
        values = {"vcpu": self.hardware.vcpu, "memory_mb": self.hardware.memory,
                  "gpu": self.hardware.gpu,
                  "timeout_s": None if self.timeout is None else self.timeout.total_seconds()}
        for name, value in values.items():
            if value is not None:
                check_provisioning(name, value)
        return {k: v for k, v in values.items() if v is not None}


# Limits of a step's resources (jobcell.model.runner.ProfileResources).
MAX_TIMEOUT_S = 366 * 86400
_LIMITS: dict[str, tuple[str, float, float, bool]] = {
    # name: (setting, smallest, largest, whole number)
    "vcpu": ("provisioning.hardware.vcpu", 1e-9, 1_000_000, False),
    "memory_mb": ("provisioning.hardware.memory (MiB)", 1, 2**40, True),
    "gpu": ("provisioning.hardware.gpu", 0, 1024, True),
    "timeout_s": ("provisioning.timeout (seconds)", 1e-9, MAX_TIMEOUT_S, False),
}


def check_provisioning(name: str, value: Any) -> None:
    """Raise ValueError unless ``value`` is a valid provisioning ``name``."""
    setting, low, high, whole = _LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or (whole and value != int(value)):
        raise ValueError(f"{setting} must be a {'whole ' if whole else ''}number, got "
                         f"{value!r}")
    if not low <= value <= high:
        lowest = "more than 0" if low < 1e-6 else f"at least {low:g}"
        raise ValueError(f"{setting} must be {lowest} and at most {high:g}, got {value!r}")


@dataclass
class Throttling:
    """``disable_submissions``: never submit; only re-attach or serve from the cache."""

    disable_submissions: bool = False


class TaskConfig(Callbacks):
    """The task client configuration (``global_config``, or a scope's copy of it)."""

    def __init__(self) -> None:
        self.backend: Backend | None = None
        self.cache: CacheConfiguration = CacheConfigurationSQLite()
        self.throttling = Throttling()
        self.provisioning = Provisioning()
        # On Ctrl-C while awaiting: None asks when interactive (else detaches), True
        # cancels the awaited executions, False detaches (they go on; a re-run re-attaches).
        self.cancel_on_interrupt: bool | None = None
        self._init_callbacks()

    def copy(self) -> TaskConfig:
        """A copy for a scope: same backend, storage and callbacks; own settings."""
        new = TaskConfig.__new__(TaskConfig)
        new.backend = self.backend
        new.cache = self.cache.copy()
        new.throttling = copy.deepcopy(self.throttling)
        new.provisioning = copy.deepcopy(self.provisioning)
        new.cancel_on_interrupt = self.cancel_on_interrupt
        new._init_callbacks(shared=self)
        return new

    def resolved_backend(self) -> Backend:
        """The configured backend, or the shared default :class:`LocalBackend`."""
        if self.backend is not None:
            return self.backend
        global _default_backend
        if _default_backend is None:
            from jobcell.client.backends import LocalBackend

            _default_backend = LocalBackend()
        return _default_backend

    def __repr__(self) -> str:
        return (f"TaskConfig(backend={self.backend!r}, cache={self.cache!r}, "
                f"throttling={self.throttling!r}, provisioning={self.provisioning!r})")


_default_backend: Backend | None = None
global_config = TaskConfig()
_scoped: ContextVar[TaskConfig | None] = ContextVar("jobcell_scoped_config", default=None)


def current_config() -> TaskConfig:
    """The configuration in effect here: the innermost scope's, else ``global_config``."""
    return _scoped.get() or global_config


def _positive(name: str, value: Any, kind: type = float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or value < 0:
        raise ValueError(f"scoped_config: {name} must be a non-negative number, got {value!r}")
    if kind is int and value != int(value):
        raise ValueError(f"scoped_config: {name} must be a whole number, got {value!r}")
    return kind(value)


def _apply(config: TaskConfig, shortcuts: dict[str, Any]) -> None:
    for first, second in (("memory_mb", "memory_gb"), ("timeout", "timeout_minutes"),
                          ("timeout", "timeout_hours"), ("timeout_minutes", "timeout_hours")):
        if first in shortcuts and second in shortcuts:
            raise ValueError(f"scoped_config: give {first} or {second}, not both")
    _apply_shortcuts(config, shortcuts)
    config.provisioning.to_dict()      # refuse values a backend would refuse, here


def _apply_shortcuts(config: TaskConfig, shortcuts: dict[str, Any]) -> None:
    hardware, provisioning = config.provisioning.hardware, config.provisioning
    for name, value in shortcuts.items():
        if name == "vcpu":
            hardware.vcpu = _positive(name, value)
        elif name == "memory_mb":
            hardware.memory = _positive(name, value, int)
        elif name == "memory_gb":
            hardware.memory = int(_positive(name, value) * 1024)
        elif name == "gpu":
            hardware.gpu = _positive(name, value, int)
        elif name == "timeout":
            provisioning.timeout = (value if isinstance(value, timedelta)
                                    else timedelta(seconds=_positive(name, value)))
        elif name == "timeout_minutes":
            provisioning.timeout = timedelta(minutes=_positive(name, value))
        elif name == "timeout_hours":
            provisioning.timeout = timedelta(hours=_positive(name, value))
        elif name == "cache_mode":
            config.cache.mode = CacheMode(value)
        elif name == "disable_submissions":
            config.throttling.disable_submissions = bool(value)
        else:
            known = ("vcpu, memory_mb, memory_gb, gpu, timeout, timeout_minutes, "
                     "timeout_hours, cache_mode, disable_submissions")
            raise TypeError(f"scoped_config got an unknown option {name!r} (known: {known})")


@contextlib.contextmanager
def scoped_config(**shortcuts: Any) -> Iterator[TaskConfig]:
    """Apply ``shortcuts`` to a copy of the current configuration inside the block.

    Shortcuts: ``vcpu``, ``memory_mb``, ``memory_gb``, ``gpu``, ``timeout``
    (timedelta or seconds), ``timeout_minutes``, ``timeout_hours``, ``cache_mode``,
    ``disable_submissions``.
    """
    config = current_config().copy()
    _apply(config, shortcuts)
    token = _scoped.set(config)
    try:
        yield config
    finally:
        _scoped.reset(token)
