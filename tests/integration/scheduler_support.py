"""Helpers for the scheduler policy tests: shell runners, a fake GPU host, time intervals."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from integration_support import attempt_dir

from jobcell.model.states import TERMINAL_JOB_STATES
from jobcell.service import Cell
from unit.fake_trees import fake_nvidia_smi

Interval = tuple[float, float]

# Writes what the step saw in the two device variables ("unset" when absent) to seen.txt,
# whole (written aside, then renamed), then waits for its gate file. Braces are doubled:
# single ones are args_template placeholders.
DEVICE_PROBE = [
    "-c",
    'printf "%s\\n%s\\n" "${{CUDA_VISIBLE_DEVICES-unset}}" "${{JOBCELL_GPU_DEVICES-unset}}" '
    '> "$1/seen.tmp" && mv "$1/seen.tmp" "$1/seen.txt"; '
    'while [ ! -e "$2" ]; do sleep 0.02; done',
    "probe", "{output_dir}", "{gate}"]


def register_sh(cell: Cell, name: str, script: str, *extra_args: str,
                **fields: Any) -> None:
    """Register a runner that runs ``sh -c SCRIPT name EXTRA_ARGS...`` (templated)."""
    cell.register_runner({"name": name, "command": "sh",
                          "args_template": ["-c", script, name, *extra_args], **fields})


def register_probe(cell: Cell, name: str, **resources: int) -> None:
    """A :data:`DEVICE_PROBE` runner with a ``gate`` param (default: a path that exists)."""
    cell.register_runner({"name": name, "command": "sh", "args_template": DEVICE_PROBE,
                          "params": {"gate": {"type": "string", "default": "/"}},
                          "resources": {"cpu_slots": 1, "memory_mb": 10, **resources}})


def fake_gpu_host(monkeypatch: pytest.MonkeyPatch, bin_dir: Path,
                  visible: str | None = None) -> None:
    """Put a fake two-GPU ``nvidia-smi`` first on PATH for this process and the workers
    it starts; ``visible`` sets CUDA_VISIBLE_DEVICES (None: neither variable is set)."""
    fake_nvidia_smi(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)


def probe_saw(cell: Cell, job_id: str, step_id: str) -> tuple[str, str] | None:
    """``(CUDA_VISIBLE_DEVICES, JOBCELL_GPU_DEVICES)`` as a probe step saw them (None until
    it has written them)."""
    path = attempt_dir(cell, job_id, step_id) / "output" / "seen.txt"
    if not path.exists():
        return None
    cuda, jobcell = path.read_text().split("\n")[:2]
    return cuda, jobcell


def step_state(cell: Cell, job_id: str, step_id: str) -> str:
    return next(s["state"] for s in cell.status(job_id)["steps"] if s["id"] == step_id)


def all_finished(cell: Cell, job_ids: Iterable[str]) -> bool:
    return all(cell.status(job)["state"] in TERMINAL_JOB_STATES for job in job_ids)


def step_interval(cell: Cell, job_id: str, attempt: int = -1) -> Interval:
    """``(started_at, finished_at)`` of one attempt of the job's only step (worker clock)."""
    row = cell.store.attempts(job_id)[attempt]
    assert row.finished_at is not None, row
    return row.started_at, row.finished_at


def overlaps(first: Interval, second: Interval) -> bool:
    return max(first[0], second[0]) < min(first[1], second[1])


def overlapping_pairs(intervals: dict[str, Interval]) -> list[tuple[str, str]]:
    """Names of the intervals that overlap one another."""
    return [(a, b) for a, b in itertools.combinations(sorted(intervals), 2)
            if overlaps(intervals[a], intervals[b])]
