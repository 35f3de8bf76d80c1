"""Python callable runners used by the integration tests (imported in a child interpreter)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jobcell.pyrunner import StepContext


def add(a: int, b: int) -> dict[str, int]:
    """Return the sum as a JSON value."""
    return {"sum": a + b, "attempt": int(os.environ["JOBCELL_ATTEMPT"])}


def double_upstream(context: StepContext) -> dict[str, Any]:
    """Read the upstream step's value and staged files; write a file of its own."""
    upstream = context.inputs["add"]["value"]
    staged = sorted(p.name for p in (context.input_dir / "add").iterdir())
    (context.output_dir / "doubled.txt").write_text(str(upstream["sum"] * 2))
    return {"doubled": upstream["sum"] * 2, "staged": staged}


def boom(message: str) -> None:
    """Fail with ``message``."""
    raise ValueError(message)


def not_json() -> object:
    """Return a value that is not JSON-serialisable."""
    return object()


def where_inputs_are(context: StepContext) -> dict[str, Any]:
    """Whether each upstream's manifest ``dir`` lies in this attempt's own directory."""
    return {node: {"inside": entry["dir"].startswith(str(context.step_dir) + "/"),
                   "files": sorted(p.name for p in Path(entry["dir"]).iterdir())}
            for node, entry in context.inputs.items()}
