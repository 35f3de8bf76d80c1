"""The server-side step cache, wired into the worker, on a real SQLite cell.

Every runner program appends a line to a counter file when it really runs, so
"ran once" is counted, not inferred. Identical resubmissions by one owner are
deduplicated to the same job, so the twins here differ in node id, owner,
label or downstream step.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import pytest
from cache_support import (
    event_kinds,
    register_gated,
    register_gen,
    register_use,
    runs,
    sha256_hex,
    step_state,
    write_cache_tools,
)
from integration_support import attempt_dir, events_of, register_tool, run_worker, wait_for

from jobcell.service import Cell
from jobcell.stepcache import CACHE_MARKER

MIB = 1 << 20


@pytest.fixture
def cache_tools(tmp_path: Path) -> Path:
    """The path of the counting runner program ``cache_tools.py``."""
    return write_cache_tools(tmp_path)


@pytest.fixture
def counter(tmp_path: Path) -> Path:
    """The file the runner under test appends one line to per real run."""
    return tmp_path / "runs"


def single(runner: str, node: str = "a", label: str = "c", **fields: Any) -> dict[str, Any]:
    """A one-node pipeline; ``fields`` go to the job spec, except ``params``/``cache``
    which go to the node."""
    node_spec: dict[str, Any] = {"id": node, "runner": runner}
    for key in ("params", "cache"):
        if key in fields:
            node_spec[key] = fields.pop(key)
    return {"label": label, "pipeline": [node_spec], **fields}


def chain(up: str, down: str, label: str = "c", **up_params: Any) -> dict[str, Any]:
    """``up`` (runner gen with ``up_params``) feeding ``down`` (runner use)."""
    return {"label": label, "pipeline": [
        {"id": up, "runner": "gen", "params": up_params},
        {"id": down, "runner": "use", "inputs": [up]}]}


def states(cell: Cell, job_id: str) -> list[tuple[str, str]]:
    return [(s["id"], s["state"]) for s in cell.status(job_id)["steps"]]


def cached_from(cell: Cell, job_id: str) -> list[tuple[str, str, str]]:
    """(step, source job, source step) of each ``step_cached`` event of the job."""
    return [(e["step"], e["source_job"], e["source_step"])
            for e in events_of(cell, job_id, "step_cached")]


def run_twice(cell: Cell, first: dict[str, Any], second: dict[str, Any],
              between: Callable[[], None] | None = None, **second_submit: Any
              ) -> tuple[str, str]:
    """Submit and finish ``first``, then (after ``between``) ``second``."""
    one = cell.submit(first).job_id
    run_worker(cell)
    if between is not None:
        between()
    two = cell.submit(second, **second_submit)
    assert not two.deduplicated, "the second job must be a new job, not a dedup of the first"
    run_worker(cell)
    return one, two.job_id


def wait_waiting_step(cell: Cell) -> tuple[str, str]:
    """Wait until exactly one step waits on a running twin; its (job id, step id)."""
    found = wait_for(lambda: cell.store.steps_in_states(["waiting_cache"]), 20,
                     "a step waiting for its running twin")
    assert len(found) == 1, found
    return found[0].job_id, found[0].step_id


def two_gated_jobs(cell: Cell, counter: Path) -> tuple[tuple[str, str], tuple[str, str]]:
    """Two identical gated jobs (different node ids) under the daemon worker; returns
    ((leader job, step), (waiter job, step)) once one waits for the other and the
    leader's program has started."""
    jobs = {cell.submit(single("gated", node=node)).job_id: node for node in ("a", "b")}
    cell.ensure_worker()
    waiter = wait_waiting_step(cell)
    wait_for(lambda: runs(counter), 20, "the leader's program to start")
    leader = next((job, node) for job, node in jobs.items() if job != waiter[0])
    return leader, waiter


# -- a completed twin ----------------------------------------------------------------------

def test_completed_twin_is_hard_linked_and_consumed_downstream(cell: Cell, cache_tools: Path,
                                                               tmp_path: Path) -> None:
    gen_runs, use_runs = tmp_path / "gen-runs", tmp_path / "use-runs"
    register_gen(cell, cache_tools, gen_runs)
    register_use(cell, cache_tools, use_runs)
    first, second = run_twice(cell, single("gen", params={"text": "payload"}),
                              chain("b", "consume", text="payload"))

    assert cell.status(second)["state"] == "succeeded"
    assert states(cell, second) == [("b", "cached"), ("consume", "succeeded")]
    assert len(runs(gen_runs)) == 1 and len(runs(use_runs)) == 1
    assert cached_from(cell, second) == [("b", first, "a")]
    assert [a.state for a in cell.store.attempts(second) if a.step_id == "b"] == ["cached"]

    source = {o["name"]: o for o in cell.outputs(first)}
    copies = {o["name"]: o for o in cell.outputs(second) if o["step"] == "b"}
    assert sorted(copies) == sorted(source) == ["data.txt"]
    copy, original = Path(copies["data.txt"]["path"]), Path(source["data.txt"]["path"])
    assert copy == attempt_dir(cell, second, "b") / "output" / "data.txt"
    assert copy.read_bytes() == original.read_bytes() == b"payload"
    assert copies["data.txt"]["blake3"] == source["data.txt"]["blake3"] \
        == blake3.blake3(b"payload").hexdigest()
    assert copies["data.txt"]["size"] == source["data.txt"]["size"] == len(b"payload")
    assert (copy.stat().st_ino, copy.stat().st_dev) == (original.stat().st_ino,
                                                        original.stat().st_dev)
    used = (attempt_dir(cell, second, "consume") / "output" / "used.txt").read_text()
    assert used == f"b/\nb/data.txt {sha256_hex(b'payload')}\n"


def test_identical_nodes_of_one_job_run_once(cell: Cell, cache_tools: Path,
                                             counter: Path) -> None:
    register_gen(cell, cache_tools, counter)
    job = cell.submit({"label": "c", "pipeline": [
        {"id": "a", "runner": "gen"}, {"id": "b", "runner": "gen"}]}).job_id
    run_worker(cell)
    assert cell.status(job)["state"] == "succeeded"
    assert sorted(state for _, state in states(cell, job)) == ["cached", "succeeded"]
    assert len(runs(counter)) == 1


def test_twin_whose_files_are_gone_is_not_reused(cell: Cell, cache_tools: Path,
                                                 counter: Path) -> None:
    register_gen(cell, cache_tools, counter)
    first = cell.submit(single("gen")).job_id
    run_worker(cell)
    shutil.rmtree(attempt_dir(cell, first, "a"))
    second = cell.submit(single("gen", node="b")).job_id
    run_worker(cell)
    assert states(cell, second) == [("b", "succeeded")]
    assert len(runs(counter)) == 2
    assert (attempt_dir(cell, second, "b") / "output" / "data.txt").read_text() == "hello"


# -- what the key covers -------------------------------------------------------------------

def test_different_param_value_is_no_twin(cell: Cell, cache_tools: Path,
                                          counter: Path) -> None:
    register_gen(cell, cache_tools, counter)
    _, second = run_twice(cell, single("gen", params={"text": "x"}),
                          single("gen", node="b", params={"text": "y"}))
    assert states(cell, second) == [("b", "succeeded")]
    assert len(runs(counter)) == 2 and cached_from(cell, second) == []


def test_different_upstream_content_is_no_twin(cell: Cell, cache_tools: Path,
                                               tmp_path: Path) -> None:
    use_runs = tmp_path / "use-runs"
    register_gen(cell, cache_tools, tmp_path / "gen-runs")
    register_use(cell, cache_tools, use_runs)
    _, second = run_twice(cell, chain("up", "down", text="x"), chain("up2", "down", text="y"))
    assert states(cell, second) == [("up2", "succeeded"), ("down", "succeeded")]
    assert len(runs(use_runs)) == 2 and cached_from(cell, second) == []


def test_same_upstream_content_from_another_runner_is_a_twin(cell: Cell, cache_tools: Path,
                                                             tmp_path: Path) -> None:
    use_runs = tmp_path / "use-runs"
    register_gen(cell, cache_tools, tmp_path / "gen-runs")
    register_gen(cell, cache_tools, tmp_path / "gen2-runs", name="gen2")
    register_use(cell, cache_tools, use_runs)
    first, second = run_twice(cell, chain("up", "down"), {"label": "c", "pipeline": [
        {"id": "up", "runner": "gen2"}, {"id": "down", "runner": "use", "inputs": ["up"]}]})
    assert states(cell, second) == [("up", "succeeded"), ("down", "cached")]
    assert len(runs(use_runs)) == 1 and cached_from(cell, second) == [("down", first, "down")]


def test_empty_directory_in_upstream_outputs_changes_the_key(cell: Cell, cache_tools: Path,
                                                             tmp_path: Path) -> None:
    use_runs = tmp_path / "use-runs"
    register_gen(cell, cache_tools, tmp_path / "gen-runs")
    register_use(cell, cache_tools, use_runs)
    plain, with_empty = run_twice(cell, chain("up", "down"),
                                  chain("up", "down", shape="empty-dir"))
    assert states(cell, with_empty) == [("up", "succeeded"), ("down", "succeeded")]
    assert len(runs(use_runs)) == 2
    used = (attempt_dir(cell, with_empty, "down") / "output" / "used.txt").read_text()
    assert "up/empty/" in used.splitlines()
    # control: the same tree without the empty directory is a twin of the first job
    # (another owner, so that whole-job dedup does not answer first)
    again = cell.submit(chain("up", "down"), owner="control").job_id
    run_worker(cell)
    assert states(cell, again) == [("up", "cached"), ("down", "cached")]
    assert len(runs(use_runs)) == 2 and ("down", plain, "down") in cached_from(cell, again)


def test_upstream_node_id_in_the_staged_paths_is_in_the_key(cell: Cell, cache_tools: Path,
                                                            tmp_path: Path) -> None:
    """A pipeline stages each input under ``input/<upstream id>/``: the step sees those
    paths (here it lists them), so a renamed upstream is a different input."""
    use_runs = tmp_path / "use-runs"
    register_gen(cell, cache_tools, tmp_path / "gen-runs")
    register_use(cell, cache_tools, use_runs)
    _, second = run_twice(cell, chain("up", "down"), chain("renamed", "down"))
    assert states(cell, second) == [("renamed", "cached"), ("down", "succeeded")]
    used = (attempt_dir(cell, second, "down") / "output" / "used.txt").read_text()
    assert used.splitlines()[0] == "renamed/", used
    assert len(runs(use_runs)) == 2


def test_root_step_of_ordered_steps_is_a_twin_of_the_same_pipeline_node(
        cell: Cell, cache_tools: Path, counter: Path) -> None:
    """A step without inputs stages nothing, so the input layout changes nothing it sees."""
    register_gen(cell, cache_tools, counter)
    first, second = run_twice(cell, single("gen"),
                              {"label": "c", "steps": [{"id": "a", "runner": "gen"}]})
    assert states(cell, second) == [("a", "cached")]
    assert len(runs(counter)) == 1 and cached_from(cell, second) == [("a", first, "a")]


@pytest.mark.parametrize("change", [
    {"env": {"EXTRA": "1"}}, {"extra_args": ("--changed",)}, {"version": "2"}],
    ids=["env", "args", "version"])
def test_changed_runner_definition_is_no_twin(cell: Cell, cache_tools: Path, counter: Path,
                                              change: dict[str, Any]) -> None:
    register_gen(cell, cache_tools, counter)
    first, second = run_twice(cell, single("gen"), single("gen", node="b"),
                              between=lambda: register_gen(cell, cache_tools, counter,
                                                           **change))
    assert states(cell, second) == [("b", "succeeded")]
    assert len(runs(counter)) == 2 and cached_from(cell, second) == []
    hashes = {cell.status(j)["steps"][0]["runner_hash"] for j in (first, second)}
    assert len(hashes) == 2


@pytest.mark.parametrize(("second", "submit"), [
    (single("gen", node="b"), {}),
    (single("gen"), {"owner": "bob"}),
    (single("gen", node="b", priority=7, tags=["other"]), {"owner": "carol"}),
], ids=["node-id", "owner", "priority-tags-owner"])
def test_node_id_owner_priority_and_tags_are_not_in_the_key(
        cell: Cell, cache_tools: Path, counter: Path, second: dict[str, Any],
        submit: dict[str, Any]) -> None:
    register_gen(cell, cache_tools, counter)
    first, job = run_twice(cell, single("gen", tags=["one"]), second, **submit)
    node = second["pipeline"][0]["id"]
    assert cell.status(job)["state"] == "succeeded"
    assert states(cell, job) == [(node, "cached")]
    assert len(runs(counter)) == 1 and cached_from(cell, job) == [(node, first, "a")]


@pytest.mark.parametrize("resources", [
    {"memory_mb": 512, "cpu_slots": 1, "timeout_s": 60},
    {"memory_mb": 100, "cpu_slots": 2, "timeout_s": 60},
    {"memory_mb": 100, "cpu_slots": 1, "timeout_s": 120}],
    ids=["memory_mb", "cpu_slots", "timeout_s"])
def test_provisioning_is_not_in_the_key(cell: Cell, cache_tools: Path, counter: Path,
                                        resources: dict[str, Any]) -> None:
    register_gen(cell, cache_tools, counter,
                 resources={"memory_mb": 100, "cpu_slots": 1, "timeout_s": 60})
    first, second = run_twice(cell, single("gen"), single("gen", node="b"),
                              between=lambda: register_gen(cell, cache_tools, counter,
                                                           resources=resources))
    assert states(cell, second) == [("b", "cached")]
    assert len(runs(counter)) == 1 and cached_from(cell, second) == [("b", first, "a")]


# -- a running twin -------------------------------------------------------------------------

def test_running_twin_is_waited_on_without_a_lease(cell: Cell, cache_tools: Path,
                                                   counter: Path, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    register_gated(cell, cache_tools, counter, gate)
    try:
        leader, waiter = two_gated_jobs(cell, counter)
        scheduler = cell.scheduler_status()
        assert [(lease["job_id"], lease["step"]) for lease in scheduler["leases"]] == [leader]
        assert scheduler["queue"]["waiting_cache"] == 1
        assert scheduler["queue"]["depth"] == 0
        assert cell.status(waiter[0])["steps"][0]["attempt"] == 0
    finally:
        gate.write_text("")
    for job in (leader[0], waiter[0]):
        assert cell.wait(job, timeout_s=20)["state"] == "succeeded"
    assert states(cell, waiter[0]) == [(waiter[1], "cached")]
    assert len(runs(counter)) == 1
    wait_events = events_of(cell, waiter[0], "step_cache_wait")
    assert [(e["source_job"], e["source_step"]) for e in wait_events] == [leader]
    assert cached_from(cell, waiter[0]) == [(waiter[1], *leader)]
    kinds = event_kinds(cell, waiter[0], waiter[1])
    assert kinds.index("step_cache_wait") < kinds.index("step_cached")
    assert "step_started" not in kinds
    assert (attempt_dir(cell, waiter[0], waiter[1]) / "output" / "result.txt").read_text() \
        == "hello"


def test_waiter_runs_itself_when_its_twin_fails(cell: Cell, cache_tools: Path,
                                                counter: Path, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    register_gated(cell, cache_tools, counter, gate, fail_first=True)
    try:
        leader, waiter = two_gated_jobs(cell, counter)
    finally:
        gate.write_text("")
    assert cell.wait(leader[0], timeout_s=20)["state"] == "failed"
    assert cell.wait(waiter[0], timeout_s=20)["state"] == "succeeded"
    assert states(cell, waiter[0]) == [(waiter[1], "succeeded")]
    assert len(runs(counter)) == 2
    kinds = event_kinds(cell, waiter[0], waiter[1])
    order = [kinds.index(k) for k in ("step_cache_wait", "step_requeued", "step_started",
                                      "step_succeeded")]
    assert order == sorted(order), kinds
    assert "step_cached" not in kinds


def test_cancelling_a_waiting_job_leaves_the_twin_running(cell: Cell, cache_tools: Path,
                                                          counter: Path,
                                                          tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    register_gated(cell, cache_tools, counter, gate)
    try:
        leader, waiter = two_gated_jobs(cell, counter)
        answer = cell.cancel(waiter[0], wait_s=10)
        assert answer["cancelled"] is True, answer
        assert step_state(cell, leader[0], leader[1]) == "running"
        assert cell.scheduler_status()["queue"]["waiting_cache"] == 0
    finally:
        gate.write_text("")
    assert cell.wait(leader[0], timeout_s=20)["state"] == "succeeded"
    status = cell.status(waiter[0])
    assert (status["state"], status["steps"][0]["state"], status["steps"][0]["attempt"]) == (
        "cancelled", "cancelled", 0)
    assert len(runs(counter)) == 1
    assert "step_cached" not in event_kinds(cell, waiter[0], waiter[1])


def test_cancelling_the_twin_makes_the_waiter_run_itself(cell: Cell, cache_tools: Path,
                                                         counter: Path,
                                                         tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    register_gated(cell, cache_tools, counter, gate)
    try:
        leader, waiter = two_gated_jobs(cell, counter)
        assert cell.cancel(leader[0], wait_s=10)["cancelled"] is True
        wait_for(lambda: len(runs(counter)) == 2, 20, "the waiter to run itself")
    finally:
        gate.write_text("")
    assert cell.wait(waiter[0], timeout_s=20)["state"] == "succeeded"
    assert states(cell, waiter[0]) == [(waiter[1], "succeeded")]
    assert "step_requeued" in event_kinds(cell, waiter[0], waiter[1])


# -- opting out and scopes ------------------------------------------------------------------

@pytest.mark.parametrize("opt_out", ["job", "node", "runner"])
def test_opted_out_step_runs_again(cell: Cell, cache_tools: Path, counter: Path,
                                   opt_out: str) -> None:
    register_gen(cell, cache_tools, counter, **({"cacheable": False} if opt_out == "runner"
                                                else {}))
    second = {"job": {**single("gen", node="b"), "cache": False},
              "node": {"label": "c", "pipeline": [{"id": "b", "runner": "gen",
                                                   "cache": False}]},
              "runner": single("gen", node="b")}[opt_out]
    _, job = run_twice(cell, single("gen"), second)
    assert states(cell, job) == [("b", "succeeded")]
    assert len(runs(counter)) == 2 and cached_from(cell, job) == []
    assert "step_cache_wait" not in event_kinds(cell, job, "b")


@pytest.mark.parametrize(("scope", "expected_runs"), [("label", 2), ("cell", 1)])
def test_reuse_across_labels_only_with_cell_scope(cell: Cell, cache_tools: Path,
                                                  counter: Path, scope: str,
                                                  expected_runs: int) -> None:
    register_gen(cell, cache_tools, counter, cache_scope=scope)
    first, second = run_twice(cell, single("gen", label="A"), single("gen", label="B"))
    assert len(runs(counter)) == expected_runs
    if scope == "cell":
        assert states(cell, second) == [("a", "cached")]
        assert cached_from(cell, second) == [("a", first, "a")]
    else:
        assert states(cell, second) == [("a", "succeeded")]
        assert cached_from(cell, second) == []


# -- crash safety ---------------------------------------------------------------------------

def plant_leftovers(cell: Cell, job_id: str, step_id: str, source_job: str) -> Path:
    """What a worker killed in the middle of a cache copy of attempt 1 leaves behind."""
    root = attempt_dir(cell, job_id, step_id)
    building = root.with_name(root.name + ".caching")
    (building / "output").mkdir(parents=True)
    (building / "output" / "half.txt").write_text("half a copy")
    (root / "output").mkdir(parents=True)
    (root / CACHE_MARKER).write_text(json.dumps(
        {"job_id": source_job, "step_id": "a", "attempt": 1}))
    (root / "output" / "stale.txt").write_text("from an uncommitted copy")
    return root


def test_leftover_cache_copy_does_not_break_the_next_copy(cell: Cell, cache_tools: Path,
                                                          counter: Path) -> None:
    register_gen(cell, cache_tools, counter)
    first = cell.submit(single("gen")).job_id
    run_worker(cell)
    second = cell.submit(single("gen", node="b")).job_id
    root = plant_leftovers(cell, second, "b", first)
    run_worker(cell)
    assert states(cell, second) == [("b", "cached")]
    assert len(runs(counter)) == 1
    assert sorted(p.name for p in (root / "output").iterdir()) == ["data.txt"]
    assert [o["name"] for o in cell.outputs(second)] == ["data.txt"]
    assert not root.with_name(root.name + ".caching").exists()


def test_leftover_cache_copy_does_not_break_a_real_run(cell: Cell, cache_tools: Path,
                                                       counter: Path) -> None:
    register_gen(cell, cache_tools, counter)
    job = cell.submit(single("gen", params={"text": "fresh"})).job_id
    root = plant_leftovers(cell, job, "a", "no-such-job")
    run_worker(cell)
    assert states(cell, job) == [("a", "succeeded")]
    assert len(runs(counter)) == 1
    assert sorted(p.name for p in (root / "output").iterdir()) == ["data.txt"]
    assert [o["name"] for o in cell.outputs(job)] == ["data.txt"]
    assert (root / "output" / "data.txt").read_text() == "fresh"


# -- the file-hash memo ---------------------------------------------------------------------

def test_file_hash_memo_is_persisted(cell: Cell, cache_tools: Path, tmp_path: Path) -> None:
    register_tool(cell, cache_tools, "big", ["big", str(tmp_path / "big-runs"), "{output_dir}",
                                             "5"])
    register_use(cell, cache_tools, tmp_path / "use-runs")
    job = cell.submit({"label": "c", "pipeline": [
        {"id": "up", "runner": "big"}, {"id": "down", "runner": "use", "inputs": ["up"]}]}
    ).job_id
    run_worker(cell)
    assert cell.status(job)["state"] == "succeeded"
    row = cell.store.get_job(job)
    assert row is not None
    assert next(s for s in row.steps if s.step_id == "down").step_key is not None  # looked up
    output = next(o for o in cell.outputs(job) if o["step"] == "up")
    path = Path(output["path"])
    memo = cell.store.file_hash(str(path))
    assert memo is not None, "the digest of the upstream output was not persisted"
    st = path.stat()
    assert (memo.size, memo.mtime_ns, memo.inode) == (5 * MIB, st.st_mtime_ns, st.st_ino)
    assert memo.blake3 == output["blake3"] == blake3.blake3(path.read_bytes()).hexdigest()
