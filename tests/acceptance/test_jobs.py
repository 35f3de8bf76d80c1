"""The happy path, as a user drives it: runners, submit, wait, inspect, list, dedup."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from .helpers import Cli, write_runner_files, write_spec

SPEC = """\
    label: acceptance
    tags: [first, second]
    steps:
      - id: write
        runner: writer
        params: {text: "hello jobcell ", repeat: 3}
"""


@pytest.fixture(scope="module")
def finished(shared_cli: Cli, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One job submitted and waited for through the CLI."""
    spec = write_spec(tmp_path_factory.mktemp("specs"), "spec.yaml", SPEC)
    submitted = shared_cli.json("submit", str(spec))
    assert set(submitted) == {"job_id", "deduplicated"}
    assert submitted["deduplicated"] is False
    job_id = submitted["job_id"]
    # The worker was started on demand by submit.
    worker = shared_cli.json("worker", "status")
    assert worker["alive"] is True and isinstance(worker["pid"], int)
    waited = shared_cli.run("wait", job_id, "--json")
    return {"spec": spec, "job_id": job_id, "wait": waited}


def test_runners_list_and_show(shared_cli: Cli) -> None:
    listed = shared_cli.json("runners", "list")
    names = {r["name"] for r in listed["runners"]}
    assert {"writer", "join", "failing", "slow"} <= names
    assert listed["errors"] == {}
    writer = next(r for r in listed["runners"] if r["name"] == "writer")
    assert writer["version"] == "1.0"
    assert writer["kind"] == "command"
    assert writer["source"] == str(shared_cli.home / "runners" / "writer.yaml")

    shown = shared_cli.json("runners", "show", "writer")
    assert shown["name"] == "writer"
    assert shown["params"]["text"]["default"] == "hello"
    assert shown["resources"]["memory_mb"] == 64
    assert os.path.isabs(shown["command_path"])  # python3 resolved on PATH when loaded
    assert shown["hash"] == writer["hash"]


def test_runners_validate(shared_cli: Cli, tmp_path: Path) -> None:
    valid = shared_cli.run("runners", "validate", str(shared_cli.home / "runners" / "join.yaml"))
    assert valid.returncode == 0, str(valid)
    assert "join" in valid.stdout
    answer = shared_cli.json("runners", "validate",
                             str(shared_cli.home / "runners" / "join.yaml"))
    assert answer["valid"] is True and answer["name"] == "join"

    bad = tmp_path / "broken.yaml"
    bad.write_text('name: broken\ncommand: python3\nresources: {memory_mb: -5}\n')
    result = shared_cli.run("runners", "validate", str(bad))
    assert result.returncode == 1, str(result)
    assert "Traceback" not in result.stderr
    assert str(bad) in result.stderr          # the file
    assert "resources.memory_mb" in result.stderr  # the field
    assert "greater than or equal to 0" in result.stderr  # the problem


def test_invalid_runner_file_in_registry_is_reported(cli: Cli) -> None:
    (cli.home / "runners" / "typo.yaml").write_text(
        "name: typo\ncommand: python3\nretries: many\n")
    listed = cli.json("runners", "list")
    assert "writer" in {r["name"] for r in listed["runners"]}
    problem = listed["errors"][str(cli.home / "runners" / "typo.yaml")]
    assert "retries" in problem


def test_wait_and_status(finished: dict[str, Any]) -> None:
    waited = finished["wait"]
    assert waited.returncode == 0, str(waited)
    assert waited.json["state"] == "succeeded"
    assert waited.json["job_id"] == finished["job_id"]


def test_status_json(shared_cli: Cli, finished: dict[str, Any]) -> None:
    status = shared_cli.json("status", finished["job_id"])
    assert status["job_id"] == finished["job_id"]
    assert status["state"] == "succeeded"
    assert status["label"] == "acceptance"
    assert status["tags"] == ["first", "second"]
    assert status["progress"]["total"] == 1 and status["progress"]["done"] == 1
    [step] = status["steps"]
    assert step["id"] == "write"
    assert step["runner"] == "writer"
    assert step["state"] == "succeeded"
    assert step["attempt"] == 1
    assert step["exit_code"] == 0
    assert step["error"] is None
    assert step["runner_hash"]
    # The human form names the job, its state and its step.
    text = shared_cli.ok("status", finished["job_id"]).stdout
    assert finished["job_id"] in text and "succeeded" in text and "write" in text


def test_logs(shared_cli: Cli, finished: dict[str, Any]) -> None:
    logs = shared_cli.json("logs", finished["job_id"], "--last", "1")
    assert logs["job_id"] == finished["job_id"]
    [entry] = logs["steps"]
    assert entry["step"] == "write" and entry["attempt"] == 1
    assert entry["stdout"] == ["stdout line 3"]
    assert entry["stderr"] == ["stderr note"]

    everything = shared_cli.json("logs", finished["job_id"], "--step", "write")
    assert everything["steps"][0]["stdout"] == ["stdout line 1", "stdout line 2",
                                                "stdout line 3"]
    text = shared_cli.ok("logs", finished["job_id"], "--step", "write").stdout
    assert "stdout line 2" in text and "stderr note" in text


def test_outputs(shared_cli: Cli, finished: dict[str, Any]) -> None:
    outputs = shared_cli.json("outputs", finished["job_id"])
    [out] = outputs
    assert set(out) >= {"step", "name", "path", "size", "blake3"}
    assert out["step"] == "write" and out["name"] == "out.txt"
    path = Path(out["path"])
    assert path.is_file()
    assert path.is_relative_to(shared_cli.home)
    assert path.read_text() == "hello jobcell " * 3
    assert out["size"] == path.stat().st_size == len("hello jobcell " * 3)
    assert len(out["blake3"]) == 64 and int(out["blake3"], 16) >= 0


def test_result(shared_cli: Cli, finished: dict[str, Any]) -> None:
    result = shared_cli.json("result", finished["job_id"])
    assert result["job_id"] == finished["job_id"]
    assert result["state"] == "succeeded"
    assert result["error"] is None
    assert "write" in result["steps"]
    assert [o["name"] for o in result["outputs"]] == ["out.txt"]


def test_events(shared_cli: Cli, finished: dict[str, Any]) -> None:
    events = shared_cli.json("events", finished["job_id"])
    kinds = [e["kind"] for e in events]
    for kind in ("submitted", "step_started", "step_succeeded", "job_succeeded"):
        assert kind in kinds, kinds
    assert kinds[0] == "submitted" and kinds[-1] == "job_succeeded"
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    assert next(e for e in events if e["kind"] == "step_succeeded")["step"] == "write"


def test_list_filters(shared_cli: Cli, finished: dict[str, Any]) -> None:
    job_id = finished["job_id"]

    def ids(*options: str) -> list[str]:
        return [j["job_id"] for j in shared_cli.json("list", *options)]

    [row] = shared_cli.json("list", "--label", "acceptance")
    assert row["job_id"] == job_id
    assert row["state"] == "succeeded" and row["tags"] == ["first", "second"]
    assert job_id in ids("--state", "succeeded")
    assert job_id in ids("--tag", "second")
    assert ids("--label", "acceptance", "--state", "failed") == []
    assert ids("--tag", "no-such-tag") == []


def test_same_spec_is_deduplicated(shared_cli: Cli, finished: dict[str, Any]) -> None:
    again = shared_cli.json("submit", str(finished["spec"]))
    assert again == {"job_id": finished["job_id"], "deduplicated": True}
    text = shared_cli.ok("submit", str(finished["spec"])).stdout
    assert finished["job_id"] in text and "deduplicated" in text
    # Dedup is per owner: someone else's identical spec is a job of its own.
    theirs = shared_cli.json("submit", str(finished["spec"]), "--owner", "someone-else")
    assert theirs["deduplicated"] is False and theirs["job_id"] != finished["job_id"]
    [row] = shared_cli.json("list", "--owner", "someone-else")
    assert row["job_id"] == theirs["job_id"] and row["owner"] == "someone-else"
    # Newest first: skipping the newest (theirs) leaves ours.
    page = shared_cli.json("list", "--label", "acceptance", "--offset", "1", "--limit", "1")
    assert [j["job_id"] for j in page] == [finished["job_id"]]


def test_submit_from_stdin_with_label_and_tag(shared_cli: Cli) -> None:
    spec = {"steps": [{"id": "only", "runner": "writer", "params": {"text": "from stdin"}}]}
    answer = shared_cli.json("submit", "-", "--label", "piped", "--tag", "t-one",
                             "--tag", "t-two", stdin=json.dumps(spec))
    assert answer["deduplicated"] is False
    job_id = answer["job_id"]
    final = shared_cli.run("wait", job_id, "--json")
    assert final.returncode == 0, str(final)
    status = final.json
    assert status["label"] == "piped"
    assert {"t-one", "t-two"} <= set(status["tags"])
    assert [j["job_id"] for j in shared_cli.json("list", "--tag", "t-two")] == [job_id]
    [out] = shared_cli.json("outputs", job_id)
    assert Path(out["path"]).read_text() == "from stdin"
    # Tags are not part of the spec hash: the same steps and label are the same job.
    again = shared_cli.json("submit", "-", "--label", "piped", stdin=json.dumps(spec))
    assert again == {"job_id": job_id, "deduplicated": True}


def test_runner_registry_paths_env(bare_cli: Cli, tmp_path: Path) -> None:
    folder = write_runner_files(tmp_path / "elsewhere")
    env = {"JOBCELL_RUNNER_REGISTRY_PATHS": str(folder)}
    listed = bare_cli.json("runners", "list", env=env)
    assert {"writer", "join"} <= {r["name"] for r in listed["runners"]}
    assert bare_cli.json("runners", "list")["runners"] == []
    spec = write_spec(tmp_path, "spec.json", json.dumps(
        {"label": "env-registry", "steps": [{"runner": "writer", "params": {"text": "x"}}]}))
    final = bare_cli.run("submit", str(spec), "--wait", "--json", env=env)
    assert final.returncode == 0, str(final)
    assert final.json["state"] == "succeeded"


DAG_SPEC = """\
    # A diamond-free join: two independent writers feed one joiner.
    label: dag
    tags: [pipeline]
    pipeline:
      - id: left
        runner: writer
        params: {text: "L"}
      - id: right
        runner: writer
        params: {text: "R", repeat: 2}
      - id: both
        runner: join
        inputs: [left, right]
"""

STEPS_SPEC = """\
    label: classic
    steps:
      - id: first
        runner: writer
        params: {text: "one"}
      - id: second
        runner: join
"""


def _joined(cli: Cli, job_id: str, step: str) -> str:
    [out] = [o for o in cli.json("outputs", job_id) if o["step"] == step]
    assert out["name"] == "joined.txt"
    return Path(out["path"]).read_text()


def test_dag_pipeline_with_a_join(shared_cli: Cli, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "dag.yaml", DAG_SPEC)
    final = shared_cli.run("submit", str(spec), "--wait", "--json")
    assert final.returncode == 0, str(final)
    status = final.json
    assert status["deduplicated"] is False
    assert status["state"] == "succeeded"
    assert status["label"] == "dag"
    steps = {s["id"]: s for s in status["steps"]}
    assert set(steps) == {"left", "right", "both"}
    assert all(s["state"] == "succeeded" and s["exit_code"] == 0 for s in steps.values())
    assert sorted(steps["both"]["inputs"]) == ["left", "right"]
    # Each upstream node's files are staged under input/<node_id>/.
    assert _joined(shared_cli, status["job_id"], "both") == "left/out.txt=L\nright/out.txt=RR\n"
    # The join started only after both of its inputs had finished.
    events = shared_cli.json("events", status["job_id"])
    seq = {(e["kind"], e["step"]): e["seq"] for e in events}
    assert seq[("step_started", "both")] > seq[("step_succeeded", "left")]
    assert seq[("step_started", "both")] > seq[("step_succeeded", "right")]
    outputs = {o["step"] for o in shared_cli.json("outputs", status["job_id"])}
    assert outputs == {"left", "right", "both"}


def test_classic_steps(shared_cli: Cli, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "steps.yaml", STEPS_SPEC)
    final = shared_cli.run("submit", str(spec), "--wait", "--json")
    assert final.returncode == 0, str(final)
    status = final.json
    assert status["state"] == "succeeded"
    assert [s["id"] for s in status["steps"]] == ["first", "second"]
    assert [s["state"] for s in status["steps"]] == ["succeeded", "succeeded"]
    # With steps: the previous step's files land directly in the next step's input/.
    assert _joined(shared_cli, status["job_id"], "second") == "out.txt=one\n"
    # The human form of submit --wait prints the id and the final table.
    again = shared_cli.run("submit", str(spec), "--wait")
    assert again.returncode == 0, str(again)
    assert status["job_id"] in again.stdout and "deduplicated" in again.stdout
