"""The worker running real child processes through the wrapper, on a real SQLite cell."""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import pyrunners_demo
import pytest
from integration_support import (
    attempt_dir,
    events_of,
    pid_gone,
    register_tool,
    run_worker,
    step_of,
    wait_child_pid,
    wait_for,
)

from jobcell.errors import NotFoundError, QuotaError, SpecError
from jobcell.service import Cell

STAMP = ["stamp", "{output_dir}", "{name}", "{seconds}"]
STAMP_PARAMS = {"name": {"type": "string"}, "seconds": {"type": "number", "default": 0.6}}


def register_stamp(cell: Cell, tools: Path, name: str = "stamp", **fields: Any) -> None:
    register_tool(cell, tools, name, STAMP, params=STAMP_PARAMS, **fields)


def interval(cell: Cell, job_id: str, step_id: str, name: str) -> tuple[float, float]:
    data = json.loads((attempt_dir(cell, job_id, step_id) / "output" / f"{name}.json")
                      .read_text())
    return data["start"], data["end"]


def assert_group_killed(recorded: dict[str, int]) -> None:
    """The runner and its grandchild are gone (SIGKILL is delivered asynchronously)."""
    wait_for(lambda: pid_gone(recorded["runner"]) and pid_gone(recorded["grandchild"]), 5,
             f"the attempt's processes {recorded} to be killed")


def overlaps(first: tuple[float, float], second: tuple[float, float]) -> bool:
    return max(first[0], second[0]) < min(first[1], second[1])


# -- pipelines and ordered steps ----------------------------------------------------------

def test_dag_runs_independent_nodes_in_parallel_and_join_sees_both(cell: Cell,
                                                                    tools: Path) -> None:
    register_stamp(cell, tools)
    register_tool(cell, tools, "join", ["join", "{input_dir}", "{output_dir}"],
                  outputs=["listing.json"])
    job = cell.submit({"label": "dag", "pipeline": [
        {"id": "a", "runner": "stamp", "params": {"name": "a"}},
        {"id": "b", "runner": "stamp", "params": {"name": "b"}},
        {"id": "join", "runner": "join", "inputs": ["a", "b"]}]}).job_id
    run_worker(cell)

    status = cell.status(job)
    assert status["state"] == "succeeded", status
    assert [s["state"] for s in status["steps"]] == ["succeeded"] * 3
    a, b = interval(cell, job, "a", "a"), interval(cell, job, "b", "b")
    assert overlaps(a, b), f"independent nodes did not overlap: a={a} b={b}"
    join_start = step_of(status, "join")["started_at"]
    assert join_start >= step_of(status, "a")["finished_at"]
    assert join_start >= step_of(status, "b")["finished_at"]

    join_dir = attempt_dir(cell, job, "join")
    listing = json.loads((join_dir / "output" / "listing.json").read_text())
    assert listing["files"] == ["a/a.json", "a/a.txt", "b/b.json", "b/b.txt"]
    assert (join_dir / "input" / "a" / "a.txt").read_text() == "data from a\n"
    assert (join_dir / "input" / "b" / "b.txt").read_text() == "data from b\n"
    # staged without copying: the same file as the upstream output
    staged = (join_dir / "input" / "a" / "a.txt").stat()
    original = (attempt_dir(cell, job, "a") / "output" / "a.txt").stat()
    assert (staged.st_ino, staged.st_dev) == (original.st_ino, original.st_dev)
    manifest = json.loads((join_dir / "inputs.json").read_text())["inputs"]
    assert manifest == listing["manifest"]["inputs"]
    assert sorted(manifest) == ["a", "b"]
    assert manifest["a"]["dir"] == str(join_dir / "input" / "a")
    assert sorted(f["path"] for f in manifest["b"]["files"]) == ["b.json", "b.txt"]
    kinds = [e["kind"] for e in cell.events(job)]
    assert kinds[0] == "submitted" and kinds[-1] == "job_succeeded"
    assert kinds.count("step_started") == 3 and kinds.count("step_succeeded") == 3


def test_ordered_steps_stage_the_predecessor_flat(cell: Cell, tools: Path) -> None:
    register_tool(cell, tools, "make", ["write", "{output_dir}", "made.txt", "{text}"],
                  params={"text": {"type": "string"}}, outputs=["made.txt"])
    register_tool(cell, tools, "join", ["join", "{input_dir}", "{output_dir}"])
    job = cell.submit({"label": "ordered", "steps": [
        {"runner": "make", "params": {"text": "first"}},
        {"runner": "make", "params": {"text": "second"}},
        {"runner": "join"}]}).job_id
    run_worker(cell)

    status = cell.status(job)
    assert status["state"] == "succeeded", status
    ids = [s["id"] for s in status["steps"]]
    assert ids == ["0-make", "1-make", "2-join"]
    assert [s["inputs"] for s in status["steps"]] == [[], ["0-make"], ["1-make"]]
    last = attempt_dir(cell, job, "2-join")
    listing = json.loads((last / "output" / "listing.json").read_text())
    assert listing["files"] == ["made.txt"]          # flat: no <id>/ folder
    assert (last / "input" / "made.txt").read_text() == "second"
    manifest = json.loads((last / "inputs.json").read_text())["inputs"]
    assert list(manifest) == ["1-make"] and manifest["1-make"]["dir"] == str(last / "input")
    # the second step saw the first one's file, and its own output replaced nothing upstream
    second = attempt_dir(cell, job, "1-make")
    assert (second / "input" / "made.txt").read_text() == "first"
    assert (attempt_dir(cell, job, "0-make") / "output" / "made.txt").read_text() == "first"


# -- Python callable runners --------------------------------------------------------------

def test_python_callable_runners_return_json_values(cell: Cell) -> None:
    cell.register_runner(pyrunners_demo.add, params={"a": {"type": "integer"},
                                                     "b": {"type": "integer"}})
    here = str(Path(pyrunners_demo.__file__).parent)
    cell.register_runner({"name": "double", "python": "pyrunners_demo:double_upstream",
                          "python_path": [here], "outputs": ["doubled.txt"]})
    job = cell.submit({"label": "py", "pipeline": [
        {"id": "add", "runner": "add", "params": {"a": 2, "b": 3}},
        {"id": "double", "runner": "double", "inputs": ["add"]}]}).job_id
    run_worker(cell)

    result = cell.result(job)
    assert result["state"] == "succeeded", cell.status(job)
    assert result["result"] == {"doubled": 10, "staged": ["output.json"]}
    assert result["steps"]["add"] == {"sum": 5, "attempt": 1}
    names = {(o["step"], o["name"]) for o in result["outputs"]}
    assert names == {("add", "output.json"), ("double", "doubled.txt"),
                     ("double", "output.json")}
    assert cell.runner("add").python == "pyrunners_demo:add"


def test_python_runner_exception_fails_the_step_with_its_message(cell: Cell) -> None:
    cell.register_runner(pyrunners_demo.boom, params={"message": {"type": "string"}})
    cell.register_runner(pyrunners_demo.not_json, name="not_json")
    failing = cell.submit({"label": "py", "steps": [
        {"runner": "boom", "params": {"message": "the sample sheet is empty"}}]}).job_id
    unserialisable = cell.submit({"label": "py", "steps": [{"runner": "not_json"}]}).job_id
    run_worker(cell)

    status = cell.status(failing)
    assert status["state"] == "failed"
    step = status["steps"][0]
    assert step["state"] == "failed" and step["exit_code"] == 1
    assert "ValueError: the sample sheet is empty" in step["error"]
    assert "the sample sheet is empty" in status["error"]
    assert cell.result(failing)["result"] is None
    assert "Traceback" in "\n".join(cell.logs(failing)["steps"][0]["stderr"])

    status = cell.status(unserialisable)
    assert status["state"] == "failed"
    assert "TypeError" in status["steps"][0]["error"]
    assert not (attempt_dir(cell, unserialisable, "0-not_json") / "output"
                / "output.json").exists()


# -- failure, retries, timeouts -----------------------------------------------------------

def test_missing_declared_output_is_a_failure(cell: Cell, tools: Path) -> None:
    register_tool(cell, tools, "liar", ["write", "{output_dir}", "other.txt", "x"],
                  outputs=["promised.txt"])
    job = cell.submit({"label": "out", "steps": [{"runner": "liar"}]}).job_id
    run_worker(cell)
    status = cell.status(job)
    assert status["state"] == "failed"
    step = status["steps"][0]
    assert step["exit_code"] == 0 and step["state"] == "failed"
    assert "promised.txt" in step["error"] and "missing" in step["error"]
    assert cell.outputs(job) == []        # nothing registered from a failed attempt


def test_retry_with_backoff_then_success(make_cell: Callable[..., Cell], tools: Path) -> None:
    cell = make_cell(retry_backoff_s=0.4)
    register_tool(cell, tools, "flaky", ["fail-once", "{output_dir}"], retries=2,
                  outputs=["result.txt"])
    job = cell.submit({"label": "retry", "steps": [{"runner": "flaky"}]}).job_id
    run_worker(cell)

    status = cell.status(job)
    assert status["state"] == "succeeded", status
    assert status["steps"][0]["attempt"] == 2
    attempts = cell.store.attempts(job)
    assert [(a.attempt, a.exit_code) for a in attempts] == [(1, 3), (2, 0)]
    assert attempts[0].state != "succeeded" and attempts[1].state == "succeeded"
    assert attempts[1].started_at - attempts[0].finished_at >= 0.4   # the backoff was kept
    retry = events_of(cell, job, "retry_scheduled")
    assert len(retry) == 1 and retry[0]["attempt"] == 2 and retry[0]["delay_s"] == 0.4
    failed = events_of(cell, job, "step_failed")
    assert len(failed) == 1 and failed[0]["final"] is False and failed[0]["exit_code"] == 3
    ok = attempt_dir(cell, job, "0-flaky", 2) / "output" / "result.txt"
    assert ok.read_text() == "ok on attempt 2\n"
    assert "fails on purpose" in (attempt_dir(cell, job, "0-flaky", 1) / "stderr.log").read_text()


def test_retries_exhausted_fail_the_job(cell: Cell, tools: Path) -> None:
    register_tool(cell, tools, "bad", ["exit", "5"], retries=2)
    job = cell.submit({"label": "retry", "steps": [{"runner": "bad"}]}).job_id
    run_worker(cell)
    status = cell.status(job)
    assert status["state"] == "failed"
    assert status["steps"][0]["attempt"] == 3
    assert [a.exit_code for a in cell.store.attempts(job)] == [5, 5, 5]
    assert len(events_of(cell, job, "retry_scheduled")) == 2
    assert [e["final"] for e in events_of(cell, job, "step_failed")] == [False, False, True]
    assert "exit code 5" in status["error"] and "exiting with 5" in status["error"]


def test_timeout_kills_the_whole_process_group(cell: Cell, tools: Path, tmp_path: Path) -> None:
    pids = tmp_path / "pids.json"
    register_tool(cell, tools, "hang", ["grandchild", str(pids)],
                  resources={"timeout_s": 3, "memory_mb": 10})  # room to start on a busy box
    job = cell.submit({"label": "timeout", "steps": [{"runner": "hang"}]}).job_id
    run_worker(cell)

    status = cell.status(job)
    assert status["state"] == "failed"
    step = status["steps"][0]
    assert "timed out after 3 s" in step["error"]
    recorded = json.loads(pids.read_text())
    # the grandchild ignores TERM: only a KILL sent to the whole process group ends it
    assert_group_killed(recorded)
    assert step["exit_code"] is not None and step["exit_code"] != 0


def test_timeout_of_a_runner_that_ignores_term_is_a_failure_not_a_requeue(cell: Cell) -> None:
    script = "trap '' TERM; echo $$ > {step_dir}/runner.pid; sleep 300"
    cell.register_runner({"name": "stubborn", "command": "bash", "args_template": ["-c", script],
                          "resources": {"timeout_s": 1}, "retries": 0})
    job = cell.submit({"label": "timeout", "steps": [{"runner": "stubborn"}]}).job_id
    run_worker(cell, timeout_s=20)

    status = cell.status(job)
    step = status["steps"][0]
    assert (status["state"], step["state"], step["attempt"]) == ("failed", "failed", 1)
    assert "timed out" in step["error"]
    directory = attempt_dir(cell, job, "0-stubborn")
    assert not (directory / "exit_code").exists()      # the KILL left no exit code behind
    assert events_of(cell, job, "step_requeued") == []
    runner = int((directory / "runner.pid").read_text())
    wait_for(lambda: pid_gone(runner), 5, "the stubborn runner to be killed")


def test_failed_node_stops_its_running_sibling_and_cancels_downstream(
        cell: Cell, tools: Path, tmp_path: Path) -> None:
    pids = tmp_path / "pids.json"
    register_tool(cell, tools, "hang", ["grandchild", str(pids)])
    register_tool(cell, tools, "bad", ["exit-after", str(pids), "2"])
    register_tool(cell, tools, "after", ["exit", "0"])
    job = cell.submit({"label": "stop", "pipeline": [
        {"id": "hang", "runner": "hang"},
        {"id": "bad", "runner": "bad"},
        {"id": "after", "runner": "after", "inputs": ["bad", "hang"]}]}).job_id
    run_worker(cell, timeout_s=30)

    status = cell.status(job)
    assert status["state"] == "failed"
    states = {s["id"]: s["state"] for s in status["steps"]}
    assert states == {"hang": "cancelled", "bad": "failed", "after": "cancelled"}
    assert step_of(status, "after")["attempt"] == 0
    recorded = json.loads(pids.read_text())
    assert_group_killed(recorded)
    assert "step 'bad' failed" in status["error"]


def test_exit_code_is_the_authority_when_a_background_process_lingers(cell: Cell) -> None:
    script = "sleep 300 & echo $! > {step_dir}/background.pid; echo ok > {output_dir}/x.txt"
    cell.register_runner({"name": "leaky", "command": "bash", "args_template": ["-c", script],
                          "resources": {"timeout_s": 20}, "outputs": ["x.txt"]})
    job = cell.submit({"label": "leak", "steps": [{"runner": "leaky"}]}).job_id
    run_worker(cell, timeout_s=15)

    status = cell.status(job)
    step = status["steps"][0]
    assert (status["state"], step["exit_code"], step["error"]) == ("succeeded", 0, None)
    background = int((attempt_dir(cell, job, "0-leaky") / "background.pid").read_text())
    wait_for(lambda: pid_gone(background), 5, "the leftover background process to be killed")


# -- cancel -------------------------------------------------------------------------------

def test_cancel_running_job_with_daemon_kills_it(cell: Cell, tools: Path, tmp_path: Path) -> None:
    pids = tmp_path / "pids.json"
    register_tool(cell, tools, "hang", ["grandchild", str(pids)])
    register_tool(cell, tools, "after", ["exit", "0"])
    job = cell.submit({"label": "cancel", "pipeline": [
        {"id": "hang", "runner": "hang"},
        {"id": "after", "runner": "after", "inputs": ["hang"]}]}).job_id
    cell.ensure_worker()
    wait_child_pid(cell, job, "hang")
    wait_for(pids.exists, what="the runner's pid file")

    answer = cell.cancel(job, wait_s=20)
    assert answer["cancelled"] is True and answer["state"] == "cancelled"
    status = cell.status(job)
    assert [s["state"] for s in status["steps"]] == ["cancelled", "cancelled"]
    assert status["cancel_requested"] is True
    recorded = json.loads(pids.read_text())
    assert_group_killed(recorded)
    kinds = [e["kind"] for e in cell.events(job)]
    assert "cancel_requested" in kinds and kinds.count("step_cancelled") == 2
    assert kinds[-1] == "cancelled"
    assert cell.cancel(job)["cancelled"] is False      # already ended: nothing to do


def test_cancel_queued_job_never_starts_it(cell: Cell, tools: Path) -> None:
    register_tool(cell, tools, "ok", ["exit", "0"])
    cancelled = cell.submit({"label": "c", "steps": [{"runner": "ok"}, {"runner": "ok"}]}).job_id
    kept = cell.submit({"label": "c", "cache": False, "steps": [{"runner": "ok"}]}).job_id
    assert cell.cancel(cancelled, wait_s=0)["cancelled"] is False    # no worker yet
    run_worker(cell)
    status = cell.status(cancelled)
    assert status["state"] == "cancelled"
    assert [(s["state"], s["attempt"]) for s in status["steps"]] == [("cancelled", 0)] * 2
    assert cell.status(kept)["state"] == "succeeded"


def test_cancel_during_retry_backoff_does_not_wait_for_it(make_cell: Callable[..., Cell],
                                                          tools: Path) -> None:
    cell = make_cell(retry_backoff_s=60)
    register_tool(cell, tools, "bad", ["exit", "4"], retries=3)
    job = cell.submit({"label": "backoff", "steps": [{"runner": "bad"}]}).job_id
    cell.ensure_worker()
    wait_for(lambda: events_of(cell, job, "retry_scheduled"), what="the first retry")
    answer = cell.cancel(job, wait_s=10)
    assert answer["cancelled"] is True
    status = cell.status(job)
    assert (status["steps"][0]["state"], status["steps"][0]["attempt"]) == ("cancelled", 1)
    assert len(cell.store.attempts(job)) == 1


# -- admission ----------------------------------------------------------------------------

def test_cpu_slots_admission_serialises_steps(make_cell: Callable[..., Cell],
                                              tools: Path) -> None:
    cell = make_cell(cpu_slots=1)
    register_stamp(cell, tools, resources={"cpu_slots": 1, "memory_mb": 10})
    job = cell.submit({"label": "adm", "pipeline": [
        {"id": "a", "runner": "stamp", "params": {"name": "a", "seconds": 0.4}},
        {"id": "b", "runner": "stamp", "params": {"name": "b", "seconds": 0.4}}]}).job_id
    run_worker(cell)
    assert cell.status(job)["state"] == "succeeded"
    a, b = interval(cell, job, "a", "a"), interval(cell, job, "b", "b")
    assert not overlaps(a, b), f"two 1-slot steps overlapped on a 1-slot cell: {a} {b}"


def test_memory_admission_serialises_steps(make_cell: Callable[..., Cell], tools: Path) -> None:
    cell = make_cell(node_memory_mb=1000)
    register_stamp(cell, tools, resources={"cpu_slots": 1, "memory_mb": 600})
    job = cell.submit({"label": "adm", "pipeline": [
        {"id": "a", "runner": "stamp", "params": {"name": "a", "seconds": 0.4}},
        {"id": "b", "runner": "stamp", "params": {"name": "b", "seconds": 0.4}}]}).job_id
    run_worker(cell)
    assert cell.status(job)["state"] == "succeeded"
    assert not overlaps(interval(cell, job, "a", "a"), interval(cell, job, "b", "b"))


def test_max_concurrent_limits_a_group(cell: Cell, tools: Path) -> None:
    register_stamp(cell, tools, "limited", concurrency_group="g", max_concurrent=1,
                   resources={"cpu_slots": 1, "memory_mb": 10})
    register_stamp(cell, tools, "free", resources={"cpu_slots": 1, "memory_mb": 10})
    job = cell.submit({"label": "adm", "pipeline": [
        {"id": "a", "runner": "limited", "params": {"name": "a", "seconds": 0.5}},
        {"id": "b", "runner": "limited", "params": {"name": "b", "seconds": 0.5}},
        {"id": "c", "runner": "free", "params": {"name": "c", "seconds": 1.2}}]}).job_id
    run_worker(cell)
    assert cell.status(job)["state"] == "succeeded"
    a, b, c = (interval(cell, job, n, n) for n in "abc")
    assert not overlaps(a, b)
    assert overlaps(a, c) or overlaps(b, c)     # other groups still run beside it


def test_backlog_of_a_throttled_runner_does_not_starve_others(cell: Cell, tools: Path,
                                                              tmp_path: Path) -> None:
    release = tmp_path / "release"
    register_tool(cell, tools, "throttled", ["exit-after", str(release), "0"], max_concurrent=1,
                  resources={"cpu_slots": 1, "memory_mb": 1})
    register_tool(cell, tools, "other", ["exit", "0"], resources={"cpu_slots": 1, "memory_mb": 1})
    backlog = 1100     # more than the worker's admission window, all ahead of the other job
    cell.submit_many([{"label": "hol", "cache": False, "steps": [{"runner": "throttled"}]}]
                     * backlog)
    job = cell.submit({"label": "hol", "steps": [{"runner": "other"}]}).job_id
    cell.ensure_worker()
    try:
        wait_for(lambda: cell.status(job)["state"] == "succeeded", 15,
                 "the other runner's job, behind a throttled backlog")
        assert len(cell.store.steps_in_states(["running"])) == 1   # still throttled
    finally:
        release.write_text("")


@pytest.mark.parametrize(("resources", "named"), [
    ({"cpu_slots": 64}, "cpu slots"), ({"memory_mb": 10**7}, "memory")])
def test_step_that_can_never_fit_is_refused_at_submit(
        cell: Cell, tools: Path, resources: dict[str, int], named: str) -> None:
    register_tool(cell, tools, "huge", ["exit", "0"], resources=resources)
    with pytest.raises(SpecError) as caught:
        cell.submit({"label": "big", "pipeline": [{"id": "giant", "runner": "huge"}]})
    message = str(caught.value)
    assert named in message and "'giant'" in message and "'huge'" in message
    assert cell.store.count_jobs() == 0


# -- dedup, quotas, runner sync ------------------------------------------------------------

def test_whole_job_dedup_by_spec_hash(cell: Cell, tools: Path) -> None:
    register_tool(cell, tools, "ok", ["write", "{output_dir}", "x.txt", "{text}"],
                  params={"text": {"type": "string"}})
    spec = {"label": "dedup", "tags": ["one"], "steps": [{"runner": "ok",
                                                          "params": {"text": "a"}}]}
    first = cell.submit(spec)
    assert first.deduplicated is False
    again = cell.submit({**spec, "tags": ["other"], "priority": 5})   # volatile fields differ
    assert (again.job_id, again.deduplicated) == (first.job_id, True)
    batch = cell.submit_many([spec, {**spec, "steps": [{"runner": "ok",
                                                        "params": {"text": "b"}}]}, spec])
    assert batch[0].job_id == batch[2].job_id == first.job_id
    assert batch[1].deduplicated is False and batch[1].job_id != first.job_id
    assert cell.submit(spec, owner="someone-else").deduplicated is False
    opted_out = cell.submit({**spec, "cache": False})
    assert opted_out.deduplicated is False and opted_out.job_id != first.job_id
    run_worker(cell)

    assert cell.status(first.job_id)["state"] == "succeeded"
    after = cell.submit(spec)          # a succeeded identical job is still returned
    assert after.deduplicated is True and after.job_id in (first.job_id, opted_out.job_id)
    assert cell.store.count_jobs() == 4


def test_non_cacheable_steps_opt_the_job_out_of_dedup(cell: Cell, tools: Path) -> None:
    register_tool(cell, tools, "ok", ["exit", "0"])
    register_tool(cell, tools, "effectful", ["exit", "0"], cacheable=False)
    node_opt_out = {"label": "d", "steps": [{"runner": "ok", "cache": False}]}
    runner_opt_out = {"label": "d", "steps": [{"runner": "ok"}, {"runner": "effectful"}]}
    for spec in (node_opt_out, runner_opt_out):
        first = cell.submit(spec)
        second = cell.submit(spec)
        assert not first.deduplicated and not second.deduplicated
        assert first.job_id != second.job_id
    run_worker(cell)
    for spec in (node_opt_out, runner_opt_out):
        assert cell.submit(spec).deduplicated is False    # not even against a succeeded one
    assert cell.store.count_jobs() == 6


def test_failed_job_is_not_reused_by_dedup(cell: Cell, tools: Path) -> None:
    register_tool(cell, tools, "bad", ["exit", "1"])
    spec = {"label": "dedup", "steps": [{"runner": "bad"}]}
    first = cell.submit(spec).job_id
    run_worker(cell)
    assert cell.status(first)["state"] == "failed"
    second = cell.submit(spec)
    assert second.deduplicated is False and second.job_id != first


def test_quota_max_jobs_global(make_cell: Callable[..., Cell], tools: Path) -> None:
    cell = make_cell(max_jobs_global=2)
    register_tool(cell, tools, "ok", ["exit", "0"])
    spec = {"label": "q", "cache": False, "steps": [{"runner": "ok"}]}
    cell.submit(spec)
    with pytest.raises(QuotaError, match="max_jobs_global"):
        cell.submit_many([spec, spec])          # all or none
    assert cell.store.count_jobs() == 1
    cell.submit(spec)
    with pytest.raises(QuotaError, match="max_jobs_global is 2"):
        cell.submit(spec, owner="another")
    run_worker(cell)
    cell.submit(spec)                           # ended jobs do not count
    assert cell.count_active_jobs() == 1


def test_quota_max_jobs_per_user(make_cell: Callable[..., Cell], tools: Path) -> None:
    cell = make_cell(max_jobs_per_user=1)
    register_tool(cell, tools, "ok", ["exit", "0"])
    spec = {"label": "q", "cache": False, "steps": [{"runner": "ok"}]}
    cell.submit(spec, owner="alice")
    with pytest.raises(QuotaError, match="'alice'"):
        cell.submit(spec, owner="alice")
    cell.submit(spec, owner="bob")
    assert cell.store.count_jobs(owner="alice") == 1
    run_worker(cell)
    cell.submit(spec, owner="alice")


def test_runner_autosync_picks_up_edited_files(make_cell: Callable[..., Cell], tools: Path,
                                               tmp_path: Path) -> None:
    registry = tmp_path / "site-runners"
    registry.mkdir()
    cell = make_cell(runner_registry_paths=[str(registry)])
    runner_file = registry / "greet.yaml"

    def write_version(text: str) -> None:
        runner_file.write_text(
            f"name: greet\nversion: '{text}'\ncommand: {sys.executable}\n"
            f"args_template: ['{tools}', write, '{{output_dir}}', greeting.txt, '{text}']\n"
            "outputs: [greeting.txt]\n")

    write_version("v1")
    first = cell.submit({"label": "sync", "steps": [{"runner": "greet"}]}).job_id
    write_version("v2")
    second = cell.submit({"label": "sync", "steps": [{"runner": "greet"}]})
    assert second.deduplicated is False          # another runner definition: another job
    run_worker(cell)

    def produced(job_id: str) -> str:
        return (attempt_dir(cell, job_id, "0-greet") / "output" / "greeting.txt").read_text()

    assert (produced(first), produced(second.job_id)) == ("v1", "v2")
    hash_one = cell.status(first)["steps"][0]["runner_hash"]
    hash_two = cell.status(second.job_id)["steps"][0]["runner_hash"]
    assert hash_one != hash_two
    assert hash_two == cell.runner("greet").definition_hash()
    runner_file.write_text("name: greet\ncommand: [not, valid\n")
    assert "greet" not in cell.runners()
    assert any("not valid YAML" in e for e in cell.registry.errors.values())


# -- logs and outputs ---------------------------------------------------------------------

def test_logs_return_the_last_lines(cell: Cell, tools: Path) -> None:
    register_tool(cell, tools, "talk", ["lines", "{count}"],
                  params={"count": {"type": "integer"}})
    register_tool(cell, tools, "ok", ["exit", "0"])
    job = cell.submit({"label": "logs", "pipeline": [
        {"id": "talk", "runner": "talk", "params": {"count": 500}},
        {"id": "quiet", "runner": "ok", "inputs": ["talk"]}]}).job_id
    run_worker(cell)
    logs = cell.logs(job, step="talk", last_n=3)
    assert logs["steps"] == [{"step": "talk", "attempt": 1,
                              "stdout": ["out 497", "out 498", "out 499"],
                              "stderr": ["err 497", "err 498", "err 499"]}]
    every = cell.logs(job, last_n=1000)["steps"]
    assert [len(e["stdout"]) for e in every] == [500, 0]
    assert cell.logs(job, step="talk", last_n=0)["steps"][0]["stdout"] == []
    with pytest.raises(NotFoundError):
        cell.logs(job, step="nope")


def test_outputs_list_size_and_blake3(cell: Cell, tools: Path) -> None:
    register_tool(cell, tools, "make", ["write", "{output_dir}", "data.bin", "{text}"],
                  params={"text": {"type": "string"}})
    text = "hello, outputs\n" * 100
    job = cell.submit({"label": "out", "steps": [{"runner": "make",
                                                  "params": {"text": text}}]}).job_id
    run_worker(cell)
    outputs = cell.outputs(job)
    assert len(outputs) == 1
    out = outputs[0]
    path = Path(out["path"])
    assert (out["step"], out["name"]) == ("0-make", "data.bin")
    assert path == attempt_dir(cell, job, "0-make") / "output" / "data.bin"
    assert out["size"] == len(text.encode()) == path.stat().st_size
    assert out["blake3"] == blake3.blake3(text.encode()).hexdigest()
    assert not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert os.access(path, os.R_OK)


def test_stopping_a_worker_that_runs_in_this_process_is_refused(cell: Cell) -> None:
    """A signal would hit the caller itself; the error says what to do instead."""
    from jobcell.errors import WorkerError
    from jobcell.worker import Worker

    worker = Worker(cell.home, cell.settings, cell.store)
    worker.acquire()
    try:
        with pytest.raises(WorkerError, match="inside this process"):
            cell.stop_worker(timeout_s=1)
    finally:
        worker.release()


def test_submit_many_keeps_batch_order_newest_first(cell: Cell, tools: Path) -> None:
    """Jobs of one batch list newest first in reverse submission order."""
    register_stamp(cell, tools)
    specs = [{"label": "order", "steps": [{"runner": "stamp", "params": {"name": f"n{i}"}}]}
             for i in range(20)]
    ids = [r.job_id for r in cell.submit_many(specs)]
    listed = [j["job_id"] for j in cell.list(label="order", limit=100)]
    assert listed == list(reversed(ids))


def test_idle_worker_stays_when_a_job_arrives_as_it_leaves(cell: Cell, tools: Path) -> None:
    """A job submitted while the worker decides to exit is served, not stranded."""
    from jobcell.worker import Worker

    register_stamp(cell, tools)
    worker = Worker(cell.home, cell.settings, cell.store)
    worker.acquire()
    assert worker._leave_if_still_idle() is True          # nothing active: it leaves
    assert cell.store.lock_info() is None
    worker.acquire()
    cell.submit({"label": "late", "steps": [{"runner": "stamp", "params": {"name": "x"}}]})
    assert worker._leave_if_still_idle() is False         # a job arrived: it stays
    info = cell.store.lock_info()
    assert info is not None and info.token == worker.token
    worker.release()


# -- waking the worker ---------------------------------------------------------------------

def test_submit_wakes_an_idle_worker_long_before_its_next_poll(
        make_cell: Callable[..., Cell], tools: Path) -> None:
    # With a 60 s poll, only the wake-up pipe can make the worker see the job in time.
    cell = make_cell(poll_interval_s=60, worker_idle_exit_s=0)
    register_tool(cell, tools, "ok", ["write", "{output_dir}", "x.txt", "x"])
    cell.ensure_worker()
    wait_for(lambda: cell.home.wake_pipe.exists() and cell.worker_status()["alive"], 10,
             "the worker to listen on its wake-up pipe")
    wait_for(lambda: cell.store.count_jobs() == 0, 1, "an empty cell")
    job = cell.submit({"label": "wake", "steps": [{"runner": "ok"}]}).job_id
    status = cell.wait(job, timeout_s=20, poll_s=0.02)
    assert status["state"] == "succeeded"
