"""Task functions: ``@task`` and ``task_client`` make awaitable client functions.

Awaiting one looks the execution up in the client cache (re-attach or serve a
finished one), else submits it, polls its status without blocking the event loop,
and returns the output value or raises :class:`TaskFailed`. Interrupting the wait
(Ctrl-C, cancellation) detaches: the execution goes on in the backend and the
next run of the script re-attaches to it.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
import sys
import types
import typing
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import replace
from datetime import timedelta
from typing import Any, Generic, TypeVar

from jobcell.client.backends import Backend, ExecutionRequest, ExecutionResult, TaskDefinition
from jobcell.client.cache import (
    CacheStorage,
    cache_key,
    decide,
    entry_state,
    new_entry,
)
from jobcell.client.config import CacheMode, TaskConfig, current_config
from jobcell.errors import JobcellError
from jobcell.fileref import FileRef, decode_value, file_kind, is_file_annotation, staged_name

R = TypeVar("R")
logger = logging.getLogger("jobcell.client")
_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array",
           dict: "object", tuple: "array"}


class TaskError(JobcellError):
    """A task could not be defined or executed by the client."""


class TaskDefinitionError(TaskError, TypeError):
    """``@task`` cannot turn this function into a task (signature, module)."""


class SubmissionsDisabled(TaskError):
    """``disable_submissions`` is set and the execution is in no cache."""


class TaskOutputError(TaskError):
    """The execution succeeded but its output does not match the task's return type, or
    names a file the execution does not have."""


class TaskFailed(TaskError):
    """The execution failed (or was cancelled): its error report and log tail."""

    def __init__(self, request: ExecutionRequest, result: ExecutionResult) -> None:
        self.request = request
        self.execution_id = result.execution_id
        self.state = result.state
        self.error = result.error
        self.log_tail = list(result.log_tail)
        tail = "\n".join(self.log_tail[-20:])
        super().__init__(f"task {request.task_name!r} (execution {result.execution_id}) "
                         f"{result.state}: {result.error}" + (f"\n--- log tail ---\n{tail}"
                                                              if tail else ""))


def _param_type(annotation: Any, where: str) -> tuple[str, bool]:
    """The runner param type for ``annotation`` and whether it may be None."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1 and len(typing.get_args(annotation)) == 2:
            return _param_type(members[0], where)[0], True
        raise TaskDefinitionError(f"{where}: unions other than 'X | None' are not supported")
    if is_file_annotation(annotation):
        return "string", False      # the file's name in the step's input folder
    base = origin if origin is not None else annotation
    if base in _SIMPLE:
        return _SIMPLE[base], False
    raise TaskDefinitionError(
        f"{where}: unsupported annotation {annotation!r}; use str, int, float, bool, list "
        "or dict (optionally '| None')")


def params_from_signature(function: Callable[..., Any]) -> dict[str, dict[str, Any]]:
    """Runner params (``{name: {type, default, required}}``) from the type hints.
    A parameter named ``context`` receives the runner's StepContext and is skipped."""
    name = getattr(function, "__qualname__", repr(function))
    try:
        hints = typing.get_type_hints(function)
    except Exception as exc:
        raise TaskDefinitionError(f"task {name!r}: cannot read its type hints: {exc}") from None
    params: dict[str, dict[str, Any]] = {}
    for param in inspect.signature(function).parameters.values():
        where = f"task {name!r}, parameter {param.name!r}"
        if param.name == "context":
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise TaskDefinitionError(f"{where}: *args, **kwargs and positional-only "
                                      "parameters cannot be task params")
        if param.name not in hints:
            raise TaskDefinitionError(f"{where}: needs a type annotation")
        hint = hints[param.name]
        files = file_kind(hint)
        if files is not None and files[0] == "list":
            kind, optional = "array", type(None) in typing.get_args(hint)
        else:
            kind, optional = _param_type(hint, where)
        spec: dict[str, Any] = {"type": kind}
        if param.default is not param.empty:
            if param.default is not None:
                spec["default"] = (list(param.default) if isinstance(param.default, tuple)
                                   else param.default)
            spec["required"] = False
        elif optional:
            raise TaskDefinitionError(f"{where}: an optional ('| None') parameter needs a "
                                      "default")
        params[param.name] = spec
    return params


def task_resources(memory_mb: int | None, vcpu: float | None, gpu: int | None,
                   timeout: timedelta | float | None) -> dict[str, Any]:
    """The runner's ``resources`` from the decorator's arguments."""
    resources: dict[str, Any] = {}
    if memory_mb is not None:
        resources["memory_mb"] = int(memory_mb)
    if vcpu is not None:
        resources["cpu_slots"] = max(1, math.ceil(vcpu))
    if gpu is not None:
        resources["gpus"] = int(gpu)
    if timeout is not None:
        resources["timeout_s"] = (timeout.total_seconds() if isinstance(timeout, timedelta)
                                  else float(timeout))
    return resources


# Each definition's param schema, parsed once (definitions are frozen and live as long as
# their task functions).
_SCHEMAS: dict[int, tuple[TaskDefinition, dict[str, Any]]] = {}


def _validated(definition: TaskDefinition, params: dict[str, Any]) -> dict[str, Any]:
    if not definition.params:
        return params
    from jobcell.model.params import ParamSpec, validate_params

    schema = _SCHEMAS.get(id(definition))
    if schema is None or schema[0] is not definition:
        schema = (definition, {k: ParamSpec.model_validate(v)
                               for k, v in definition.params.items()})
        _SCHEMAS[id(definition)] = schema
    try:
        return validate_params(schema[1], params, f"task {definition.name!r}")
    except ValueError as exc:
        raise TaskDefinitionError(str(exc)) from None


class TaskFunction(Generic[R]):
    """An awaitable client function: ``await f(...)``, ``f.run(...)`` in plain scripts."""

    def __init__(self, definition: TaskDefinition, label: str,
                 signature: inspect.Signature | None) -> None:
        self.definition = definition
        self.label = label
        self._signature = signature

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def version(self) -> str:
        return self.definition.version

    def _file_params(self) -> set[str]:
        return set()

    def _params(self, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, FileRef]]:
        if self._signature is None:
            if args:
                raise TypeError(f"task client {self.name!r} takes keyword arguments only")
            values = dict(kwargs)
        else:
            bound = self._signature.bind(*args, **kwargs)
            values = {k: list(v) if isinstance(v, tuple) else v
                      for k, v in bound.arguments.items() if k != "context"}
        values, files = extract_files(values, self._file_params())
        return _validated(self.definition, values), files

    def __call__(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, R]:
        """Bind the arguments and the configuration in effect now; returns the coroutine
        that runs the execution when awaited."""
        params, files = self._params(args, kwargs)
        return execute(self.definition, self.label, params, current_config(), files)

    def run(self, *args: Any, **kwargs: Any) -> R:
        """Run the task to completion from synchronous code (not inside an event loop)."""
        import asyncio

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self(*args, **kwargs))
        raise RuntimeError(f"{self.name}.run() cannot be used inside a running event loop "
                           f"(a notebook, an async function): use 'await {self.name}(...)'")

    def __repr__(self) -> str:
        return f"<task {self.name} version {self.version}>"


class DecoratedTask(TaskFunction[R]):
    """A task made by ``@task``: calling it awaits the execution; ``function`` is the
    original Python function (which the runner calls)."""

    def __init__(self, function: Callable[..., R], definition: TaskDefinition,
                 label: str) -> None:
        signature = inspect.signature(function)
        # ``context`` is the runner's StepContext, given by the runner, never by callers.
        signature = signature.replace(parameters=[
            p for p in signature.parameters.values() if p.name != "context"])
        super().__init__(definition, label, signature)
        self.function = function
        functools.update_wrapper(self, function)

    @functools.cached_property
    def _files(self) -> set[str]:
        hints = typing.get_type_hints(self.function)
        return {name for name, hint in hints.items()
                if name != "return" and file_kind(hint) is not None}

    def _file_params(self) -> set[str]:
        return self._files


def task(function: Callable[..., R] | None = None, *, version: str = "0",
         name: str | None = None, memory_mb: int | None = None, vcpu: float | None = None,
         gpu: int | None = None, timeout: timedelta | float | None = None,
         label: str | None = None) -> Any:
    """Make a module-level function a task: its runner (registered in the backend's
    cell on first call, params from the type hints) and its awaitable client.

    ``memory_mb``, ``vcpu``, ``gpu``, ``timeout`` are the runner's declared resources;
    ``label`` defaults to the function's top-level package.
    """
    def decorate(fn: Callable[..., R]) -> DecoratedTask[R]:
        module = sys.modules.get(fn.__module__)
        if fn.__module__ == "__main__" or module is None or \
                not getattr(module, "__file__", None):
            raise TaskDefinitionError(
                f"@task {fn.__qualname__!r}: a task must be defined in an importable module "
                "(its runner imports it in a child interpreter), not in the script being "
                "run; move it to a module next to the script and import it from there")
        if "." in fn.__qualname__:
            raise TaskDefinitionError(f"@task {fn.__qualname__!r}: must be a module-level "
                                      "function")
        # The module attribute keeps the name of the client function; the runner calls
        # the original function through an alias set on the module (also in the child,
        # which imports the module and so runs this decorator again).
        alias = f"_jobcell_task__{fn.__name__}"
        setattr(module, alias, fn)
        definition = TaskDefinition(
            name=name or fn.__name__, version=str(version), function=fn,
            params=params_from_signature(fn),
            resources=task_resources(memory_mb, vcpu, gpu, timeout),
            python=f"{fn.__module__}:{alias}",
            returns=typing.get_type_hints(fn).get("return"))
        return DecoratedTask(fn, definition, label or fn.__module__.split(".")[0])

    return decorate(function) if function is not None else decorate


def task_client(name: str, version: str = "0", *, label: str | None = None,
                params: dict[str, Any] | None = None) -> TaskFunction[Any]:
    """The awaitable client of a runner registered elsewhere (YAML, another package):
    ``await task_client("align", version="2")(reads="x.fq")`` (keyword arguments are
    its params). ``params``: an optional param schema to validate them before submit."""
    caller = sys._getframe(1).f_globals.get("__name__", "__main__")
    default_label = name if caller == "__main__" else caller.split(".")[0]
    definition = TaskDefinition(name=name, version=str(version), params=params or {})
    return TaskFunction(definition, label or default_label, None)


# -- the execution


def _as_ref(value: Any) -> FileRef | None:
    if isinstance(value, FileRef):
        return value
    if isinstance(value, os.PathLike):
        return FileRef.local(value)
    return None


def extract_files(params: dict[str, Any],
                  file_params: set[str]) -> tuple[dict[str, Any], dict[str, FileRef]]:
    """Params with each file (a ``FileRef``, a path, or a string for a param annotated as
    a file; or a list of them) replaced by the name it is staged under, and the files by
    those names: ``<param>/<base name>`` (``<param>/<i>/<base name>`` in a list)."""
    out = dict(params)
    files: dict[str, FileRef] = {}
    for key, value in params.items():
        wanted = key in file_params
        ref = _as_ref(value) or (FileRef.local(value) if wanted and isinstance(value, str)
                                 else None)
        if ref is not None:
            out[key] = staged_name(key, ref.basename)
            files[out[key]] = ref
        elif isinstance(value, list) and value and (wanted or all(
                _as_ref(v) is not None for v in value)):
            names = []
            for i, item in enumerate(value):
                item_ref = _as_ref(item) or (FileRef.local(item) if isinstance(item, str)
                                             else None)
                if item_ref is None:
                    raise TypeError(f"param {key!r}: item {i} is not a file: {item!r}")
                names.append(staged_name(key, item_ref.basename, i))
                files[names[-1]] = item_ref
            out[key] = names
        elif _holds_file(value):
            raise TypeError(f"param {key!r}: a file (FileRef or path) can be a param's value "
                            "or an item of a list param, not nested deeper (in a dict, or "
                            "in a list with other values)")
    return out, files


def _holds_file(value: Any) -> bool:
    if isinstance(value, (FileRef, os.PathLike)):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_file(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_file(v) for v in value.values())
    return False


def _digest(ref: FileRef) -> str:
    if ref.digest:
        return ref.digest
    import blake3

    hasher = blake3.blake3()
    for chunk in ref.chunks():
        hasher.update(chunk)
    return hasher.hexdigest()


async def _initialized(config: TaskConfig) -> Backend:
    backend = config.resolved_backend()
    if await backend.initialize():
        config.fire("backend_initialized", backend)
    return backend


def _storage(config: TaskConfig) -> CacheStorage | None:
    return None if config.cache.mode is CacheMode.DISABLED else config.cache.storage()


async def execute(definition: TaskDefinition, label: str, params: dict[str, Any],
                  config: TaskConfig, files: dict[str, FileRef] | None = None) -> Any:
    """Run one execution of ``definition`` with ``params`` (and input ``files``, by the
    names the params give them) under ``config``."""
    import asyncio

    files = files or {}
    backend = await _initialized(config)
    key_input: Any = params
    if files:
        # Files count by content, so a re-run with the same files re-attaches.
        digests = {name: await asyncio.to_thread(_digest, ref) for name, ref in files.items()}
        key_input = {"params": params, "files": digests}
    request = ExecutionRequest(definition.name, definition.version, params,
                               config.provisioning.to_dict(), label,
                               cache_key(definition.name, definition.version, key_input),
                               files=dict(files))
    config.fire("creating", request)
    mode = config.cache.mode
    storage = _storage(config)
    entry = storage.get(request.cache_key) if storage is not None else None
    if entry is not None and entry.backend != backend.identity:
        entry = None   # held by another backend: not ours to use
    decision = decide(mode, entry)
    if decision in ("use", "reattach"):
        assert entry is not None
        status = await backend.status(entry.execution_id)
        if status is None:
            decision = "miss"   # the backend no longer has it: the cache is only an index
        else:
            # A detached execution that failed since the entry was written is restarted
            # by the modes that do not use failed entries (RESTART_FAILED, REATTACH_ONLY);
            # one that succeeded meanwhile is the work they re-attach for.
            now = entry_state(status.state)
            if now == "failed" and decide(mode, replace(entry, state=now)) == "ignore":
                decision = "ignore"
        if decision in ("use", "reattach"):
            assert entry is not None and status is not None
            request.execution_id, request.state = entry.execution_id, status.state
            request.progress = dict(status.progress)
            if decision == "use":
                config.fire("cache_hit", request)
                _write(config, storage, backend, request)
                return _outcome(definition, request, await backend.result(entry.execution_id))
            config.fire("reattached", request)
            return await _observe(definition, backend, config, storage, request)
    if decision != "off":
        config.fire("cache_ignored" if decision == "ignore" else "cache_miss", request)
    if config.throttling.disable_submissions:
        why = (f"its cache entry is not used in cache mode {mode.name}" if decision == "ignore"
               else "it is in no cache")
        raise SubmissionsDisabled(
            f"task {definition.name!r} (cache key {request.cache_key}): {why}, and "
            "submissions are disabled (throttling.disable_submissions)")
    await backend.ensure_task(definition)
    fresh = mode in (CacheMode.REATTACH_ONLY, CacheMode.WRITE_ONLY, CacheMode.DISABLED)
    submit = asyncio.ensure_future(backend.submit(request, fresh=fresh))
    try:
        request.execution_id, reused = await asyncio.shield(submit)
    except asyncio.CancelledError as interrupt:
        # The submit goes on (a thread, a request in flight): wait for its answer, so the
        # execution is recorded (a re-run re-attaches) and can be cancelled if asked.
        try:
            request.execution_id, reused = await submit
        except Exception:
            raise interrupt from None
        _submitted(config, storage, backend, request, reused)
        await _interrupted(backend, config, request, interrupt)
        raise
    _submitted(config, storage, backend, request, reused)
    return await _observe(definition, backend, config, storage, request)


def _submitted(config: TaskConfig, storage: CacheStorage | None, backend: Backend,
               request: ExecutionRequest, reused: bool) -> None:
    request.state = "queued"
    config.fire("reattached" if reused else "submitted", request)
    _write(config, storage, backend, request)


def _write(config: TaskConfig, storage: CacheStorage | None, backend: Backend,
           request: ExecutionRequest) -> None:
    if storage is None or request.execution_id is None or request.state is None:
        return
    entry = new_entry(request.execution_id, request.state, backend.identity,
                      request.task_name, request.task_version)
    old = storage.get(request.cache_key)
    if old is not None and (old.execution_id, old.state, old.backend) == \
            (entry.execution_id, entry.state, entry.backend):
        return
    storage.put(request.cache_key, entry)
    config.fire("cache_write", request)


@functools.lru_cache(maxsize=256)
def _adapter(hint: Any) -> Any:
    """A pydantic TypeAdapter for a return annotation (built once: ~0.1 ms each)."""
    from pydantic import ConfigDict, TypeAdapter

    return TypeAdapter(hint, config=ConfigDict(arbitrary_types_allowed=True))


def _check_return(definition: TaskDefinition, value: Any) -> None:
    """Raise :class:`TaskOutputError` when ``value`` does not match the return hint."""
    hint = definition.returns
    if hint is None or hint is Any or is_file_annotation(hint):
        if is_file_annotation(hint) and not isinstance(value, FileRef):
            raise TaskOutputError(f"task {definition.name!r} returned {value!r}, not a file")
        return
    from pydantic import ValidationError

    try:
        try:
            adapter = _adapter(hint)
        except TypeError:           # an unhashable annotation: not cached
            adapter = _adapter.__wrapped__(hint)
        try:
            adapter.validate_python(value)
        except ValidationError:
            # A FileRef stands for a returned path: ``-> list[Path]`` holds FileRefs.
            adapter.validate_python(_refs_as_paths(value))
    except ValidationError as exc:
        raise TaskOutputError(
            f"task {definition.name!r} returned a value that does not match its return "
            f"annotation {hint.__name__ if isinstance(hint, type) else hint}: "
            f"{exc.errors()[0].get('msg', exc)} "
            f"(got {str(value)[:200]!r})") from None
    except Exception as exc:   # an annotation pydantic cannot check: say so, accept it
        logger.debug("cannot check the output of %s against %r: %s", definition.name,
                     hint, exc)


def _refs_as_paths(value: Any) -> Any:
    from pathlib import Path

    if isinstance(value, FileRef):
        return Path(value.path or value.name)
    if isinstance(value, list):
        return [_refs_as_paths(v) for v in value]
    if isinstance(value, dict):
        return {k: _refs_as_paths(v) for k, v in value.items()}
    return value


def _outcome(definition: TaskDefinition, request: ExecutionRequest,
             result: ExecutionResult) -> Any:
    request.state = result.state
    if result.state != "succeeded":
        raise TaskFailed(request, result)

    def resolve(name: str) -> FileRef:
        ref = result.files.get(name)
        if ref is None:
            raise TaskOutputError(f"the output of task {definition.name!r} (execution "
                                  f"{result.execution_id}) names file {name!r}, which the "
                                  "execution does not have")
        return ref
    value = decode_value(result.output, resolve)
    _check_return(definition, value)
    return value


_interrupt_answers: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _ask_cancel(request: ExecutionRequest) -> bool:
    """Ask once per event loop whether interrupted executions should be cancelled."""
    import asyncio

    loop = asyncio.get_running_loop()
    if loop not in _interrupt_answers:
        try:
            answer = input(f"\nInterrupted while awaiting task {request.task_name!r} "
                           f"(execution {request.execution_id}). Cancel the running "
                           "executions too? They go on otherwise, and re-running the script "
                           "re-attaches. [y/N] ")
        except (EOFError, KeyboardInterrupt):
            answer = ""
        _interrupt_answers[loop] = answer.strip().lower() in ("y", "yes")
    return _interrupt_answers[loop]


def _sigint_received(exc: BaseException) -> bool:
    """Whether the wait ended because of Ctrl-C: a KeyboardInterrupt, or a cancellation
    by ``asyncio.run``'s SIGINT handler (not a timeout or a sibling task failing)."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    import signal

    handler = signal.getsignal(signal.SIGINT)
    runner = getattr(getattr(handler, "func", None), "__self__", None)
    return bool(getattr(runner, "_interrupt_count", 0))


async def _interrupted(backend: Backend, config: TaskConfig, request: ExecutionRequest,
                       exc: BaseException) -> None:
    """Waiting ended early: the execution goes on (its pending cache entry lets a re-run
    re-attach), unless this was Ctrl-C and the user wants it cancelled."""
    import asyncio

    config.fire("interrupt_waiting", request)
    if request.execution_id is None or not _sigint_received(exc) or \
            not _cancel_wanted(config, request):
        return
    try:
        await asyncio.shield(backend.cancel(request.execution_id))
        logger.warning("cancelled execution %s of task %s", request.execution_id,
                       request.task_name)
    except Exception as error:
        logger.warning("could not cancel execution %s: %s", request.execution_id, error)


def _cancel_wanted(config: TaskConfig, request: ExecutionRequest) -> bool:
    if config.cancel_on_interrupt is not None:
        return bool(config.cancel_on_interrupt)
    interactive = sys.stdin is not None and sys.stdin.isatty() and \
        sys.stdout is not None and sys.stdout.isatty()
    return interactive and _ask_cancel(request)


async def _observe(definition: TaskDefinition, backend: Backend, config: TaskConfig,
                   storage: CacheStorage | None, request: ExecutionRequest) -> Any:
    import asyncio

    execution_id = request.execution_id
    assert execution_id is not None
    delay = backend.poll_interval_s
    seen: tuple[str, Any] | None = None
    try:
        while True:
            status = await backend.status(execution_id)
            if status is None:
                raise TaskError(f"execution {execution_id} of task {request.task_name!r} "
                                "vanished from the backend while awaited")
            request.state, request.progress = status.state, dict(status.progress)
            if seen != (status.state, status.progress):
                seen = (status.state, status.progress)
                config.fire("progress", request)
            if status.terminal:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, backend.max_poll_interval_s)
    except (asyncio.CancelledError, KeyboardInterrupt) as interrupt:
        await _interrupted(backend, config, request, interrupt)
        raise
    result = await backend.result(execution_id)
    request.state = result.state
    config.fire("finished", request)
    if entry_state(result.state) != "pending":
        _write(config, storage, backend, request)
    return _outcome(definition, request, result)
