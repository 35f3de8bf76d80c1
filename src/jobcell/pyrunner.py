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


def _call(function: Any, params: dict[str, Any], context: StepContext) -> Any:
    signature = inspect.signature(function)
    kwargs = dict(params)
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
        value = _call(function, spec.get("params", {}), context)
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
