"""Task client configuration: global values, nested scopes, contextvars isolation,
signatures turned into runner params, callbacks."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

import pytest

from jobcell.client import (
    CacheConfigurationChained,
    CacheConfigurationShelve,
    CacheConfigurationSQLite,
    CacheMode,
    current_config,
    global_config,
    scoped_config,
)
from jobcell.client.callbacks import EVENTS, Callback
from jobcell.client.task import TaskDefinitionError, params_from_signature, task


def test_defaults() -> None:
    config = current_config()
    assert config is global_config
    assert isinstance(config.cache, CacheConfigurationSQLite)
    assert config.cache.mode is CacheMode.FULLY_CACHED
    assert config.throttling.disable_submissions is False
    assert config.provisioning.to_dict() == {}
    assert config.cache.path.name == ".jobcell-cache.sqlite"
    for event in EVENTS:
        assert isinstance(getattr(config, f"on_{event}"), Callback)


def test_scopes_nest_innermost_wins_and_restore() -> None:
    with scoped_config(vcpu=2, memory_gb=4, timeout_minutes=30):
        outer = current_config()
        assert outer.provisioning.to_dict() == {"vcpu": 2.0, "memory_mb": 4096,
                                                "timeout_s": 1800.0}
        with scoped_config(memory_mb=512, gpu=1, cache_mode=CacheMode.WRITE_ONLY,
                           disable_submissions=True):
            inner = current_config()
            assert inner.provisioning.to_dict() == {"vcpu": 2.0, "memory_mb": 512, "gpu": 1,
                                                    "timeout_s": 1800.0}
            assert inner.cache.mode is CacheMode.WRITE_ONLY
            assert inner.throttling.disable_submissions
        assert current_config() is outer
        assert outer.provisioning.hardware.memory == 4096
        assert outer.cache.mode is CacheMode.FULLY_CACHED
        assert not outer.throttling.disable_submissions
    assert current_config() is global_config
    assert global_config.provisioning.to_dict() == {}
    assert global_config.cache.mode is CacheMode.FULLY_CACHED


def test_scope_restored_after_an_exception() -> None:
    with pytest.raises(RuntimeError), scoped_config(vcpu=8):
        raise RuntimeError
    assert current_config() is global_config


def test_timeout_variants() -> None:
    with scoped_config(timeout=timedelta(seconds=90)):
        assert current_config().provisioning.timeout == timedelta(seconds=90)
    with scoped_config(timeout=12.5):
        assert current_config().provisioning.timeout == timedelta(seconds=12.5)
    with scoped_config(timeout_hours=1.5):
        assert current_config().provisioning.to_dict() == {"timeout_s": 5400.0}


@pytest.mark.parametrize("kwargs, error", [
    ({"memroy_mb": 1}, TypeError),
    ({"memory_mb": 1, "memory_gb": 1}, ValueError),
    ({"timeout": 1, "timeout_hours": 1}, ValueError),
    ({"vcpu": -1}, ValueError),
    ({"memory_mb": 1.5}, ValueError),
    ({"gpu": True}, ValueError),
    ({"cache_mode": "sometimes"}, ValueError),
])
def test_bad_shortcuts(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error), scoped_config(**kwargs):
        pass
    assert current_config() is global_config


def test_global_changes_inside_a_scope_apply_after_it() -> None:
    try:
        with scoped_config(vcpu=1):
            global_config.provisioning.hardware.gpu = 3
            assert current_config().provisioning.hardware.gpu is None
        assert current_config().provisioning.hardware.gpu == 3
    finally:
        global_config.provisioning.hardware.gpu = None


def test_scope_copies_cache_mode_not_the_global_cache_object() -> None:
    chained = CacheConfigurationChained([CacheConfigurationSQLite(file="a.sqlite"),
                                         CacheConfigurationShelve(file="b")])
    with scoped_config() as config:
        config.cache = chained
        with scoped_config(cache_mode=CacheMode.DISABLED) as inner:
            assert inner.cache.mode is CacheMode.DISABLED
            assert inner.cache.caches is chained.caches
        assert chained.mode is CacheMode.FULLY_CACHED
    assert global_config.cache is not chained


def test_scopes_follow_asyncio_tasks() -> None:
    async def worker(memory: int, seen: list[tuple[int, int | None]]) -> None:
        with scoped_config(memory_mb=memory):
            for _ in range(5):
                await asyncio.sleep(0)
                seen.append((memory, current_config().provisioning.hardware.memory))

    async def main() -> list[tuple[int, int | None]]:
        seen: list[tuple[int, int | None]] = []
        with scoped_config(vcpu=4):
            await asyncio.gather(*(worker(m, seen) for m in (100, 200, 300)))
            assert current_config().provisioning.hardware.memory is None
            assert current_config().provisioning.hardware.vcpu == 4
        return seen

    seen = asyncio.run(main())
    assert len(seen) == 15
    assert all(memory == observed for memory, observed in seen)
    assert current_config() is global_config


def test_callback_decorator_and_raising_callback_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    callback = Callback("finished")

    @callback
    def first(request: Any) -> None:
        raise RuntimeError("boom")

    @callback
    def second(request: Any) -> None:
        calls.append(request)

    assert first.__name__ == "first"   # the decorator returns the function
    with caplog.at_level(logging.ERROR, logger="jobcell.client"):
        callback.fire("req")
    assert calls == ["req"]
    assert "on_finished" in caplog.text and "boom" in caplog.text
    callback.remove(first)
    assert callback.functions == (second,)
    with pytest.raises(TypeError):
        callback("not callable")  # type: ignore[arg-type]


def test_scoped_configs_share_callbacks() -> None:
    with scoped_config(vcpu=1) as config:
        assert config.on_finished is global_config.on_finished


# -- signatures


def _typed(name: str, count: int, ratio: float = 0.5, flag: bool = False,
           items: list[int] | None = None, meta: dict[str, Any] | None = None,
           context: Any = None) -> str:
    return name


def test_params_from_signature() -> None:
    assert params_from_signature(_typed) == {
        "name": {"type": "string"},
        "count": {"type": "integer"},
        "ratio": {"type": "number", "default": 0.5, "required": False},
        "flag": {"type": "boolean", "default": False, "required": False},
        "items": {"type": "array", "required": False},
        "meta": {"type": "object", "required": False},
    }


def _unannotated(x) -> None:  # type: ignore[no-untyped-def]
    pass


def _unsupported(x: set[int]) -> None:
    pass


def _union(x: int | str) -> None:
    pass


def _varargs(*xs: int) -> None:
    pass


@pytest.mark.parametrize("function, message", [
    (_unannotated, "needs a type annotation"),
    (_unsupported, "unsupported annotation"),
    (_union, "unions other than"),
    (_varargs, r"\*args"),
])
def test_unsupported_signatures(function: Any, message: str) -> None:
    with pytest.raises(TaskDefinitionError, match=message):
        params_from_signature(function)


def test_task_refuses_nested_and_main_functions() -> None:
    def inner(x: int) -> int:
        return x

    with pytest.raises(TaskDefinitionError, match="module-level"):
        task(inner)
    inner.__module__ = "__main__"
    with pytest.raises(TaskDefinitionError, match="importable module"):
        task(version="1")(inner)


def test_task_definition_from_decorator() -> None:
    decorated = task(_typed, version="2.1", memory_mb=512, vcpu=1.5, gpu=1,
                     timeout=timedelta(minutes=5))
    definition = decorated.definition
    assert (definition.name, definition.version) == ("_typed", "2.1")
    assert definition.resources == {"memory_mb": 512, "cpu_slots": 2, "gpus": 1,
                                    "timeout_s": 300.0}
    assert definition.python == f"{__name__}:_jobcell_task___typed"
    assert decorated.label == __name__.split(".")[0]
    assert decorated.function is _typed and decorated.__name__ == "_typed"
    with pytest.raises(RuntimeError, match="inside a running event loop"):
        async def inside() -> None:
            decorated.run("x", 1)
        asyncio.run(inside())
