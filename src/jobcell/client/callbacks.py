"""Callbacks: custom logic on the task client's events, registered as decorators.

Each event has a :class:`Callback` on the configuration object, named with an ``on_``
prefix (``global_config.on_finished``)::

    @global_config.on_finished
    def report(request):
        print(f"{request.task_name} finished: {request.state}")

Callbacks receive the :class:`~jobcell.client.backends.ExecutionRequest` (task name,
version, input, provisioning, execution id, state); ``on_backend_initialized``
receives the backend. A callback that raises is logged and never breaks the task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

logger = logging.getLogger("jobcell.client")

EVENTS = ("creating", "submitted", "reattached", "progress", "finished", "cache_write",
          "cache_hit", "cache_miss", "cache_ignored", "backend_initialized",
          "interrupt_waiting")

F = TypeVar("F", bound=Callable[..., Any])


class Callback:
    """The functions registered for one event; use the object as a decorator."""

    def __init__(self, event: str) -> None:
        self.event = event
        self._functions: list[Callable[..., Any]] = []

    def __call__(self, function: F) -> F:
        """Register ``function`` for this event (returned unchanged: a decorator)."""
        if not callable(function):
            raise TypeError(f"on_{self.event} takes a callable, got {function!r}")
        self._functions.append(function)
        return function

    def remove(self, function: Callable[..., Any]) -> None:
        """Unregister ``function`` (no error if it was not registered)."""
        if function in self._functions:
            self._functions.remove(function)

    def clear(self) -> None:
        """Unregister every function of this event."""
        self._functions.clear()

    @property
    def functions(self) -> tuple[Callable[..., Any], ...]:
        """The registered functions, in registration order."""
        return tuple(self._functions)

    def fire(self, *args: Any) -> None:
        """Call every registered function; one that raises is logged and skipped."""
        for function in tuple(self._functions):
            try:
                function(*args)
            except Exception:
                logger.exception("callback %s for on_%s raised (ignored)",
                                 getattr(function, "__qualname__", function), self.event)

    def __repr__(self) -> str:
        return f"<Callback on_{self.event}: {len(self._functions)} function(s)>"


class Callbacks:
    """The ``on_<event>`` attributes of a configuration object."""

    on_creating: Callback
    on_submitted: Callback
    on_reattached: Callback
    on_progress: Callback
    on_finished: Callback
    on_cache_write: Callback
    on_cache_hit: Callback
    on_cache_miss: Callback
    on_cache_ignored: Callback
    on_backend_initialized: Callback
    on_interrupt_waiting: Callback

    def _init_callbacks(self, shared: Callbacks | None = None) -> None:
        for event in EVENTS:
            attribute = f"on_{event}"
            setattr(self, attribute,
                    getattr(shared, attribute) if shared is not None else Callback(event))

    def fire(self, event: str, *args: Any) -> None:
        """Run the callbacks of ``event`` (one of :data:`EVENTS`)."""
        callback: Callback = getattr(self, f"on_{event}")
        callback.fire(*args)
