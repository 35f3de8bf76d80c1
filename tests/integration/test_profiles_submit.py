"""Resource profiles at submit: chosen by input size, recorded, and leased by the worker."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from integration_support import register_tool, run_worker, wait_for

from jobcell.service import Cell

PIXELS = {"pixels": {"type": "integer", "minimum": 0}}
IMAGING_PROFILES = [
    {"name": "preview", "count_param": "pixels", "max_count": 1000,
     "resources": {"memory_mb": 100}},
    {"name": "fullres", "resources": {"memory_mb": 300, "cpu_slots": 1}},
]


def register_imaging(cell: Cell, tools: Path, args: list[str] | None = None,
                     profiles: list[dict[str, Any]] | None = None) -> None:
    register_tool(cell, tools, "imaging", args or ["exit", "0"], params=PIXELS,
                  resources={"memory_mb": 50, "cpu_slots": 2},
                  profiles=profiles or IMAGING_PROFILES)


def submit(cell: Cell, runner: str, owner: str = "ann", **step: Any) -> str:
    return cell.submit({"label": "profiles", "steps": [{"runner": runner, **step}]},
                       owner=owner).job_id


def only_step(cell: Cell, job_id: str) -> dict[str, Any]:
    [step] = cell.status(job_id)["steps"]
    return step


def test_the_count_param_chooses_the_profile(cell: Cell, tools: Path) -> None:
    register_imaging(cell, tools)
    small = submit(cell, "imaging", params={"pixels": 640})
    large = submit(cell, "imaging", params={"pixels": 4_000_000})
    step = only_step(cell, small)
    assert (step["profile"], step["memory_mb"], step["cpu_slots"]) == ("preview", 100, 2)
    step = only_step(cell, large)
    assert (step["profile"], step["memory_mb"], step["cpu_slots"]) == ("fullres", 300, 1)
    run_worker(cell)
    attempts = {job: [a.memory_mb for a in cell.store.attempts(job)] for job in (small, large)}
    assert attempts == {small: [100], large: [300]}   # what each attempt was leased
    assert cell.status(large)["state"] == "succeeded"


def test_the_worker_leases_the_chosen_profile(cell: Cell, tools: Path,
                                              tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    register_imaging(cell, tools, ["gate-write", str(gate), "{output_dir}"])
    job_id = submit(cell, "imaging", params={"pixels": 10**6})
    worker = threading.Thread(target=run_worker, args=(cell,), daemon=True)
    worker.start()
    try:
        leases = wait_for(lambda: cell.scheduler_status()["leases"], 30, "a lease")
        assert [(lease["job_id"], lease["memory_mb"], lease["cpu_slots"])
                for lease in leases] == [(job_id, 300, 1)]
        assert cell.scheduler_status()["used"]["memory_mb"] == 300
    finally:
        gate.write_text("go")
        worker.join(30)
    assert cell.status(job_id)["state"] == "succeeded"


def test_uploaded_bytes_choose_the_profile(cell: Cell, tools: Path) -> None:
    register_tool(cell, tools, "scan", ["exit", "0"], profiles=[
        {"name": "small", "max_input_bytes": 1024, "resources": {"memory_mb": 64}},
        {"name": "large", "resources": {"memory_mb": 512}}])
    little = cell.upload(iter([b"x" * 100]), owner="ann")["digest"]
    big = cell.upload(iter([b"y" * 1000, b"z" * 1000]), owner="ann")["digest"]
    one = submit(cell, "scan", files={"a.bin": little})
    two = submit(cell, "scan", files={"a.bin": big})
    both = submit(cell, "scan", files={"a.bin": little, "b.bin": little})   # 200 bytes
    assert [only_step(cell, j)["profile"] for j in (one, two, both)] == ["small", "large",
                                                                        "small"]
    assert only_step(cell, two)["memory_mb"] == 512
    assert only_step(cell, two)["files"] == {"a.bin": big}
    run_worker(cell)
    assert [a.memory_mb for a in cell.store.attempts(two)] == [512]
    assert cell.status(two)["state"] == "succeeded"


def test_profiles_do_not_change_the_step_cache_key(cell: Cell, tools: Path) -> None:
    register_imaging(cell, tools, ["write", "{output_dir}", "out.txt", "{pixels}"])
    first = submit(cell, "imaging", params={"pixels": 5000})
    run_worker(cell)
    # Re-provision the runner: the fullres profile now asks for more memory.
    more = [IMAGING_PROFILES[0], {"name": "fullres", "resources": {"memory_mb": 400}}]
    register_imaging(cell, tools, ["write", "{output_dir}", "out.txt", "{pixels}"], more)
    second = submit(cell, "imaging", params={"pixels": 5000})
    assert second != first                       # a new runner definition: a new job
    assert only_step(cell, second)["memory_mb"] == 400
    run_worker(cell)
    assert only_step(cell, second)["state"] == "cached"   # its result was reused
    keys = [cell.store.get_job(j).steps[0].step_key for j in (first, second)]  # type: ignore[union-attr]
    assert keys[0] is not None and keys[0] == keys[1]
    assert [e["kind"] for e in cell.events(second)].count("step_cached") == 1
