"""Helpers shared by the benchmark scripts (not a test module; pytest never collects it)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

NOOP_RUNNER = {
    "name": "noop",
    "version": "1",
    "command": "true",
    "params": {"n": {"type": "integer", "default": 0}},
    "resources": {"cpu_slots": 1, "memory_mb": 1, "timeout_s": 600},
}


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {"cpus": os.cpu_count(), "python": sys.version.split()[0],
            "sqlite": sqlite3.sqlite_version, "platform": platform.platform(),
            "tmp": tempfile.gettempdir(), "loadavg": [round(x, 2) for x in os.getloadavg()]}


def filesystem(path: str | Path) -> str:
    """The filesystem type that holds ``path`` (from /proc/mounts), for the report."""
    best, kind = "", "?"
    target = str(Path(path).resolve())
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3 and (target == fields[1] or target.startswith(
                fields[1].rstrip("/") + "/")) and len(fields[1]) >= len(best):
            best, kind = fields[1], f"{fields[2]} on {fields[1]}"
    return kind


@contextmanager
def temp_home(prefix: str = "jobcell-bench-", base: str | None = None) -> Iterator[Path]:
    """A fresh, empty directory for a cell home (under ``base``, else the temp dir);
    removed afterwards (unless KEEP_HOME=1)."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield root / "home"
    finally:
        if os.environ.get("KEEP_HOME") != "1":
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"(kept {root})", file=sys.stderr)


def clean_env() -> None:
    """Drop JOBCELL_* variables so the user's environment cannot change the figures."""
    for key in list(os.environ):
        if key.startswith("JOBCELL_"):
            del os.environ[key]


def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    """Wall-clock seconds of ``repeat`` calls of ``fn``."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summary_ms(values: list[float]) -> dict[str, float]:
    """Median, p95, min and max of durations in seconds, as milliseconds."""
    return {"median_ms": statistics.median(values) * 1000,
            "p95_ms": percentile(values, 95) * 1000,
            "min_ms": min(values) * 1000, "max_ms": max(values) * 1000, "n": len(values)}


def emit(result: dict[str, Any], json_out: str | None) -> None:
    """Write the machine-readable result for run_all.py."""
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
