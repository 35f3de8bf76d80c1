"""Regressions for the review of the scheduler and the step cache: each failed before
its fix."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from integration_support import run_worker

from jobcell import retention
from jobcell.service import Cell


def register_py(cell: Cell, name: str, code: str, **fields: object) -> None:
    cell.register_runner({"name": name, "command": sys.executable,
                          "args_template": ["-c", code, "{output_dir}", "{input_dir}"],
                          **fields})


def states(cell: Cell, job_id: str) -> list[tuple[str, str]]:
    return [(s["id"], s["state"]) for s in cell.status(job_id)["steps"]]


def test_a_twin_whose_output_was_changed_in_place_is_not_served(cell: Cell) -> None:
    register_py(cell, "gen", "import sys; open(sys.argv[1]+'/r.txt','w').write('original\\n')")
    # Writes into its staged input, which is a hard link to gen's registered output.
    register_py(cell, "bad", "import os,sys; p=sys.argv[2]+'/a/r.txt'; os.chmod(p,0o644); "
                             "open(p,'a').write('TAMPERED\\n')", cacheable=False)
    first = cell.submit({"label": "c", "pipeline": [
        {"id": "a", "runner": "gen"}, {"id": "b", "runner": "bad", "inputs": ["a"]}]}).job_id
    run_worker(cell, 30)
    assert dict(states(cell, first))["b"] == "failed"
    second = cell.submit({"label": "c", "pipeline": [{"id": "x", "runner": "gen"}]}).job_id
    run_worker(cell, 30)

    assert states(cell, second) == [("x", "succeeded")]      # ran again, not "cached"
    [output] = cell.outputs(second)
    assert Path(output["path"]).read_text() == "original\n"


def test_a_fifo_among_a_twins_outputs_does_not_stop_the_worker(cell: Cell) -> None:
    register_py(cell, "mk", "import os,sys; open(sys.argv[1]+'/r.txt','w').write('x'); "
                            "os.mkfifo(sys.argv[1]+'/p')")
    first = cell.submit({"label": "c", "pipeline": [{"id": "a", "runner": "mk"}]}).job_id
    run_worker(cell, 30)
    assert cell.status(first)["state"] == "succeeded"
    second = cell.submit({"label": "c", "pipeline": [{"id": "b", "runner": "mk"}]}).job_id
    run_worker(cell, 30)
    assert states(cell, second) == [("b", "succeeded")]


def test_a_worker_that_sees_fewer_gpus_leaves_gpu_steps_queued(
        make_cell: Callable[..., Cell]) -> None:
    declared = make_cell("declared", gpu_count=1)
    register_py(declared, "needs_gpu", "pass", resources={"gpus": 1})
    job = declared.submit({"label": "g", "steps": [{"runner": "needs_gpu"}]}).job_id
    blind = make_cell("declared", gpu_count=0)          # same home, a worker seeing none
    run_worker(blind, 3)
    assert blind.status(job)["steps"][0]["state"] == "queued"
    assert blind.status(job)["state"] == "queued"


def test_the_worker_collects_a_long_backlog_in_batches(
        make_cell: Callable[..., Cell]) -> None:
    cell = make_cell(gc_interval_s=0)
    register_py(cell, "ok", "pass")
    jobs = [cell.submit({"label": "gc", "steps": [{"runner": "ok"}]}, owner=f"o{i}").job_id
            for i in range(5)]
    run_worker(cell, 30)
    later = time.time() + 86400 * 400
    original = retention.BATCH
    retention.BATCH = 2
    try:
        first = retention.collect(cell.home, cell.store, 30, later, max_batches=1)
        assert first.more and len(first.jobs) == 2
        rest = retention.collect(cell.home, cell.store, 30, later)
    finally:
        retention.BATCH = original
    assert sorted(first.jobs + rest.jobs) == sorted(jobs) and not rest.more
    assert not any((cell.home.artifacts / job).exists() for job in jobs)
