"""Child-interpreter entry for Python callable runners.

Usage: ``python -m jobcell.pyrunner package.module:function ATTEMPT_DIR``. Reads
``input.json`` (params, input paths), calls the function, and writes its
return value to ``output/output.json``. A raised exception is written to
``error.json`` and the process exits 1.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StepContext:
    """What a Python runner may ask about its step: where inputs are and outputs go."""

    step_dir: Path
    input_dir: Path
    output_dir: Path
    inputs: dict[str, Any]


def _load(target: str) -> Any:
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def _annotations(function: Any) -> dict[str, Any]:
    """The parameters' annotations, resolved where possible (strings otherwise)."""
    try:
        import typing

        return typing.get_type_hints(function)
    except Exception:
        return {name: p.annotation for name, p in inspect.signature(function).parameters.items()}


def _call(function: Any, params: dict[str, Any], context: StepContext,
          staged: set[str]) -> Any:
    from jobcell.fileref import file_kind, staged_value

    signature = inspect.signature(function)
    kwargs = dict(params)
    annotations = _annotations(function)
    for name, value in params.items():
        # A param annotated FileRef or Path (or a list of them, or '| None') names files
        # staged into the input folder; only those files, never another path.
        kind = file_kind(annotations[name]) if name in annotations else None
        if kind is None or value is None:
            continue
        if kind[0] == "file" and isinstance(value, str):
            kwargs[name] = staged_value(kind[1], value, context.input_dir, staged)
        elif kind[0] == "list" and isinstance(value, list):
            kwargs[name] = [staged_value(kind[1], v, context.input_dir, staged)
                            if isinstance(v, str) else v for v in value]
    if "context" in signature.parameters:
        kwargs["context"] = context
    return function(**kwargs)


def _relocated(inputs: dict[str, Any], staged_at: str | None,
               input_dir: Path) -> dict[str, Any]:
    """The manifest with each input's ``dir`` under ``input_dir`` (where this attempt
    really is) instead of where it was staged."""
    if not staged_at:
        return inputs
    moved = {}
    for node_id, entry in inputs.items():
        entry = dict(entry)
        with contextlib.suppress(KeyError, TypeError, ValueError):
            entry["dir"] = str(input_dir / Path(entry["dir"]).relative_to(staged_at))
        moved[node_id] = entry
    return moved


def _returns_files(value: Any) -> bool:
    """Whether a returned value holds a path or a FileRef (anything ``os.fspath`` takes
    that is not a string)."""
    if isinstance(value, (list, tuple)):
        return any(_returns_files(v) for v in value)
    if isinstance(value, dict):
        return any(_returns_files(v) for v in value.values())
    return hasattr(value, "__fspath__")


def main(argv: list[str]) -> int:
    target, attempt_dir = argv[0], Path(argv[1])
    spec = json.loads((attempt_dir / "input.json").read_text(encoding="utf-8"))
    # Paths relative to the step dir given on the command line, so the same attempt runs
    # where it was staged: on a compute node, under a path mapping, in a container.
    context = StepContext(attempt_dir, attempt_dir / "input", attempt_dir / "output",
                          _relocated(spec.get("inputs", {}), spec.get("input_dir"),
                                     attempt_dir / "input"))
    try:
        function = _load(target)
        value = _call(function, spec.get("params", {}), context, set(spec.get("files") or ()))
        if _returns_files(value):
            from jobcell.fileref import encode_returned

            value = encode_returned(value, context.output_dir)
        text = json.dumps(value)
    except BaseException as exc:
        report = {"type": type(exc).__name__, "message": str(exc),
                  "traceback": traceback.format_exc()}
        (attempt_dir / "error.json").write_text(json.dumps(report), encoding="utf-8")
        traceback.print_exc()
        return 1
    (context.output_dir / "output.json").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
