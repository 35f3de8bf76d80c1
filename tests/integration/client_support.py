"""Helpers shared by the task client tests: a task module written to a temp folder,
the client's events recorded, and a client scope with a backend and a SQLite cache."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from jobcell.client import CacheConfigurationSQLite, TaskConfig, global_config, scoped_config
from jobcell.client import cache as client_cache
from jobcell.client.callbacks import EVENTS

# Tasks every client test module has (a module's source starts with its imports, then
# these): a greeting, a failure with a log line, and one that waits for a gate file.
COMMON_TASKS = '''

@task(version="1.0", memory_mb=64)
def hello(name: str) -> str:
    return f"Hello, {name}!"


@task(version="1.0", memory_mb=64)
def fail(message: str) -> str:
    print("about to fail", flush=True)
    raise ValueError(message)


@task(version="1.0", memory_mb=64)
def gated(gate: str, tag: str) -> str:
    while not os.path.exists(gate):
        time.sleep(0.02)
    return f"opened {tag}"
'''

# Every event as (event, task name, execution id).
Events = list[tuple[str, str | None, str | None]]


@contextlib.contextmanager
def task_module(folder: Path, name: str, source: str) -> Iterator[ModuleType]:
    """Module ``name`` written to ``folder`` (where the runners' child interpreters
    import it from) and imported; removed from ``sys.path`` and ``sys.modules`` after."""
    (folder / f"{name}.py").write_text(source)
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(name, None)


@contextlib.contextmanager
def recorded_events() -> Iterator[Events]:
    """Record every client event (callbacks on ``global_config``) while inside."""
    recorded: Events = []

    def recorder(event: str) -> Callable[[Any], None]:
        def record(arg: Any) -> None:
            recorded.append((event, getattr(arg, "task_name", None),
                             getattr(arg, "execution_id", None)))
        return record

    for event in EVENTS:
        getattr(global_config, f"on_{event}")(recorder(event))
    try:
        yield recorded
    finally:
        for event in EVENTS:
            getattr(global_config, f"on_{event}").clear()


@contextlib.contextmanager
def client_scope(backend: Any, cache_file: Path) -> Iterator[TaskConfig]:
    """A configuration scope with ``backend`` and a SQLite client cache; the caches are
    closed (and the backend, when it can be) afterwards."""
    try:
        with scoped_config() as config:
            config.backend = backend
            config.cache = CacheConfigurationSQLite(file=cache_file)
            yield config
    finally:
        close = getattr(backend, "close", None)
        if callable(close):
            close()
        client_cache.close_all()


def names(events: Events) -> list[str]:
    """The event names, without ``progress``."""
    return [e[0] for e in events if e[0] != "progress"]
