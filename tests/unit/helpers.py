"""Small builders shared by the unit tests (runner definitions, specs)."""

from __future__ import annotations

from typing import Any

from jobcell.model.runner import RunnerDefinition


def make_runner(name: str = "noop", **fields: Any) -> RunnerDefinition:
    """A command runner with sensible defaults; ``fields`` override any of them."""
    data: dict[str, Any] = {"name": name, "command": "true"}
    data.update(fields)
    if "python" in fields:
        data.pop("command")
    return RunnerDefinition.model_validate(data)


def standard_runners() -> dict[str, RunnerDefinition]:
    """The runners most spec tests compile against."""
    runners = [
        make_runner("noop"),
        make_runner("make_text", params={"lines": {"type": "integer", "default": 10,
                                                   "minimum": 1}}),
        make_runner("word_count", params={
            "min_length": {"type": "integer", "default": 1, "minimum": 0},
            "mode": {"type": "string", "enum": ["words", "chars"], "default": "words"},
        }),
        make_runner("greet", params={"name": {"type": "string"}}),
    ]
    return {runner.name: runner for runner in runners}


def pipeline(*nodes: dict[str, Any], label: str = "demo", **extra: Any) -> dict[str, Any]:
    """A pipeline spec from node dicts."""
    return {"label": label, "pipeline": list(nodes), **extra}


def node(node_id: str, runner: str = "noop", inputs: list[str] | None = None,
         **extra: Any) -> dict[str, Any]:
    """One pipeline node."""
    return {"id": node_id, "runner": runner, "inputs": inputs or [], **extra}
