"""The REST API over a real cell and a real worker: submit, observe, list, cancel, runners,
the cell's figures, and every kind of bad input answered as a 4xx problem."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from integration_support import wait_for

from conftest import Api
from jobcell.model.spec import MAX_SPEC_BYTES

STAMP = ["stamp", "{output_dir}", "{name}", "{seconds}"]
STAMP_PARAMS = {"name": {"type": "string"}, "seconds": {"type": "number", "default": 0}}


def problem(response: httpx.Response, status: int) -> str:
    """The detail of a problem+json answer with ``status``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    return str(body["detail"])


def stamp_job(name: str = "a", label: str = "demo", tags: list[str] | None = None,
              runner: str = "stamp") -> dict[str, Any]:
    return {"label": label, "tags": tags or [],
            "steps": [{"runner": runner, "params": {"name": name}}]}


@pytest.fixture
def api(api: Api) -> Api:
    api.register("stamp", STAMP, params=STAMP_PARAMS, description="writes stamps",
                 env={"SECRET_TOKEN": "do-not-leak"})
    return api


def submit(api: Api, headers: dict[str, str], spec: dict[str, Any]) -> str:
    response = api.client.post("/api/v1/jobs", json=spec, headers=headers)
    assert response.status_code == 201, response.text
    return str(response.json()["job_id"])


def test_submit_run_and_observe_a_job(api: Api) -> None:
    alice = api.user("alice")
    spec = {"label": "demo", "tags": ["t1"], "pipeline": [
        {"id": "first", "runner": "stamp", "params": {"name": "one"}},
        {"id": "second", "runner": "stamp", "params": {"name": "two"}, "inputs": ["first"]}]}
    response = api.client.post("/api/v1/jobs", json=spec, headers=alice)
    assert response.status_code == 201
    answer = response.json()
    assert answer == {"job_id": answer["job_id"], "deduplicated": False}
    job = answer["job_id"]
    assert response.headers["location"] == f"/api/v1/jobs/{job}"
    assert api.client.get(f"/api/v1/jobs/{job}", headers=alice).json()["state"] == "queued"
    api.run_worker()

    status = api.client.get(f"/api/v1/jobs/{job}", headers=alice)
    assert status.status_code == 200
    assert status.json() == api.cell.status(job)     # the document of `status --json`
    assert status.json()["owner"] == "alice" and status.json()["state"] == "succeeded"
    assert status.json()["progress"] == {"total": 2, "done": 2, "states": {"succeeded": 2}}

    result = api.client.get(f"/api/v1/jobs/{job}/result", headers=alice).json()
    assert result["state"] == "succeeded" and result["error"] is None
    assert {(o["step"], o["name"]) for o in result["outputs"]} == {
        ("first", "one.json"), ("first", "one.txt"), ("second", "two.json"),
        ("second", "two.txt")}
    for entry in result["outputs"]:
        assert set(entry) == {"step", "name", "size", "blake3", "href", "expires_at"}
        assert entry["href"].startswith("http://testserver/api/v1/files/")
    home = str(api.cell.home.root)
    for path in ("result", "outputs", "logs", "events", ""):
        text = api.client.get(f"/api/v1/jobs/{job}/{path}".rstrip("/"), headers=alice).text
        assert home not in text, f"{path} discloses a server path"

    outputs = api.client.get(f"/api/v1/jobs/{job}/outputs", headers=alice).json()
    assert [(o["step"], o["name"], o["blake3"]) for o in outputs] == [
        (o["step"], o["name"], o["blake3"]) for o in api.cell.outputs(job)]

    logs = api.client.get(f"/api/v1/jobs/{job}/logs", params={"step": "second", "last_n": 5},
                          headers=alice).json()
    assert logs["job_id"] == job and [s["step"] for s in logs["steps"]] == ["second"]
    assert logs["steps"][0]["attempt"] == 1
    missing = api.client.get(f"/api/v1/jobs/{job}/logs", params={"step": "nope"},
                             headers=alice)
    assert "no step 'nope'" in problem(missing, 404)

    events = api.client.get(f"/api/v1/jobs/{job}/events", headers=alice).json()
    assert events[0]["kind"] == "submitted" and events[-1]["kind"] == "job_succeeded"
    later = api.client.get(f"/api/v1/jobs/{job}/events",
                           params={"after_seq": events[1]["seq"]}, headers=alice).json()
    assert later == events[2:]


def test_an_identical_submission_is_deduplicated(api: Api) -> None:
    alice = api.user("alice")
    first = api.client.post("/api/v1/jobs", json=stamp_job("same"), headers=alice).json()
    again = api.client.post("/api/v1/jobs", json=stamp_job("same"), headers=alice)
    assert again.status_code == 201
    assert again.json() == {"job_id": first["job_id"], "deduplicated": True}
    # Another owner's identical spec is their own job.
    bob = api.client.post("/api/v1/jobs", json=stamp_job("same"), headers=api.user("bob"))
    assert bob.json()["job_id"] != first["job_id"] and not bob.json()["deduplicated"]


def test_list_filters_and_pages(api: Api) -> None:
    alice = api.user("alice")
    a_ids = [submit(api, alice, stamp_job(f"a{i}", label="alpha", tags=["batch"]))
             for i in range(5)]
    b_ids = [submit(api, alice, stamp_job(f"b{i}", label="beta")) for i in range(2)]
    newest_first = list(reversed(a_ids))

    seen: list[str] = []
    offset: int | None = 0
    while offset is not None:
        page = api.client.get("/api/v1/jobs", params={"label": "alpha", "limit": 2,
                                                     "offset": offset}, headers=alice).json()
        assert page["limit"] == 2 and page["offset"] == offset
        seen += [j["job_id"] for j in page["jobs"]]
        offset = page["next_offset"]
    assert seen == newest_first

    everything = api.client.get("/api/v1/jobs", headers=alice).json()
    assert [j["job_id"] for j in everything["jobs"]] == list(reversed(a_ids + b_ids))
    assert everything["next_offset"] is None and everything["limit"] == 100
    summary = everything["jobs"][0]
    assert set(summary) == {"job_id", "state", "label", "owner", "tags", "priority",
                            "created_at", "finished_at", "error"}
    tagged = api.client.get("/api/v1/jobs", params={"tag": "batch"}, headers=alice).json()
    assert {j["job_id"] for j in tagged["jobs"]} == set(a_ids)
    queued = api.client.get("/api/v1/jobs", params={"state": "queued", "label": "beta"},
                            headers=alice).json()
    assert {j["job_id"] for j in queued["jobs"]} == set(b_ids)
    none = api.client.get("/api/v1/jobs", params={"state": "succeeded"}, headers=alice)
    assert none.json()["jobs"] == []


def test_list_answers_what_the_response_model_would(
        make_api: Callable[..., Api]) -> None:
    """The list routes write their JSON themselves (no response-model validation): the
    bytes are what FastAPI would have written through ``JobPage``, and each summary says
    what the job's status says."""
    from jobcell.server.api_models import JobPage

    admin_key = "list-admin-key"
    api = make_api(admin_key=admin_key)
    api.register("stamp", STAMP, params=STAMP_PARAMS)
    alice = api.user("alice")
    ids = [submit(api, alice, stamp_job(f"n{i}", label="models", tags=["ü", f"t{i}"]))
           for i in range(3)]
    api.run_worker()
    for path, headers in (("/api/v1/jobs", alice),
                          ("/api/v1/admin/jobs", {**alice, "X-Admin-Key": admin_key})):
        for params in ({"label": "models"}, {"label": "models", "limit": 2},
                       {"label": "models", "limit": 2, "offset": 2}, {"label": "none"}):
            answer = api.client.get(path, params=params, headers=headers)
            assert answer.status_code == 200, answer.text
            assert answer.headers["content-type"] == "application/json"
            page = answer.json()
            assert answer.content == JobPage.model_validate(page).model_dump_json().encode()
            assert int(answer.headers["content-length"]) == len(answer.content)
    page = api.client.get("/api/v1/jobs", params={"label": "models"}, headers=alice).json()
    assert [j["job_id"] for j in page["jobs"]] == list(reversed(ids))
    for summary in page["jobs"]:
        status = api.client.get(f"/api/v1/jobs/{summary['job_id']}", headers=alice).json()
        assert summary == {key: status[key] for key in summary}
        assert summary["state"] == "succeeded" and summary["finished_at"].endswith("Z")


def test_cancel_a_job(api: Api) -> None:
    alice = api.user("alice")
    job = submit(api, alice, stamp_job("slow"))
    answer = api.client.delete(f"/api/v1/jobs/{job}", headers=alice)
    assert answer.status_code == 200
    assert answer.json() == {"job_id": job, "state": "queued", "cancelled": False,
                             "reason": None}
    assert api.client.get(f"/api/v1/jobs/{job}", headers=alice).json()["cancel_requested"]
    api.run_worker()
    assert api.client.get(f"/api/v1/jobs/{job}", headers=alice).json()["state"] == "cancelled"
    again = api.client.delete(f"/api/v1/jobs/{job}", headers=alice).json()
    assert again["cancelled"] is False and again["reason"] == "the job is already cancelled"


def test_runners_are_described_without_server_details(api: Api) -> None:
    alice = api.user("alice")
    listing = api.client.get("/api/v1/runners", headers=alice)
    assert listing.status_code == 200
    (runner,) = listing.json()["runners"]
    assert runner["name"] == "stamp" and runner["plane"] == "artifact"
    assert runner["description"] == "writes stamps" and runner["cacheable"] is True
    assert runner["params"] == {
        "type": "object", "required": ["name"], "additionalProperties": False,
        "properties": {"name": {"type": "string"},
                       "seconds": {"type": "number", "default": 0}}}
    assert runner["resources"]["cpu_slots"] == 1 and runner["profiles"] == []
    assert runner["hash"] == api.cell.runner("stamp").definition_hash()
    one = api.client.get("/api/v1/runners/stamp", headers=alice)
    assert one.json() == runner
    for text in (listing.text, one.text):
        for secret in ("do-not-leak", "SECRET_TOKEN", str(api.tools), "python",
                       str(api.cell.home.root), "args_template", "command"):
            assert secret not in text
    assert "'nope'" in problem(api.client.get("/api/v1/runners/nope", headers=alice), 404)


def test_capabilities_and_me(api: Api) -> None:
    alice = api.user("alice")
    caps = api.client.get("/api/v1/capabilities", headers=alice)
    assert caps.status_code == 200
    found = caps.json()
    assert "home" not in found and str(api.cell.home.root) not in caps.text
    expected = api.cell.capabilities()
    expected.pop("home")
    assert found == expected
    assert api.client.get("/api/v1/me", headers=alice).json() == {"user": "alice"}


def test_the_scheduler_shows_a_user_only_their_own_jobs(api: Api, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    api.register("gate", ["gate-write", str(gate), "{output_dir}"],
                 params={"n": {"type": "integer"}}, resources={"cpu_slots": 2})
    alice, bob = api.user("alice"), api.user("bob")

    def gated(n: int) -> dict[str, Any]:
        return {"label": "gated", "steps": [{"runner": "gate", "params": {"n": n}}]}

    mine = [submit(api, alice, gated(1)), submit(api, alice, gated(2))]
    theirs = [submit(api, bob, gated(3)), submit(api, bob, gated(4))]
    worker = threading.Thread(target=api.run_worker)
    worker.start()
    try:
        def two_running() -> bool:
            return len(api.cell.scheduler_status()["leases"]) == 2

        wait_for(two_running, 20, "two steps to run")
        full = api.cell.scheduler_status()
        assert {lease["owner"] for lease in full["leases"]} == {"alice", "bob"}
        assert full["queue"]["by_owner"] == {"alice": 1, "bob": 1}
        seen = api.client.get("/api/v1/scheduler", headers=alice)
        assert seen.status_code == 200
        view = seen.json()
        assert [lease["owner"] for lease in view["leases"]] == ["alice"]
        assert view["leases"][0]["job_id"] in mine
        assert view["queue"]["by_owner"] == {"alice": 1}
        assert view["queue"]["depth"] == 2 and view["used"]["cpu_slots"] == 4
        assert "bob" not in seen.text and not any(job in seen.text for job in theirs)
        assert view["capacity"]["cpu_slots"] == 4 and "alive" in view["worker"]
    finally:
        gate.write_text("open")
        worker.join(60)


# -- bad input: always a 4xx problem with a clear detail, never a 500 ----------------------

def test_bad_job_bodies_are_4xx_problems(api: Api) -> None:
    alice = {**api.user("alice"), "Content-Type": "application/json"}

    def post(content: bytes | str) -> httpx.Response:
        return api.client.post("/api/v1/jobs", content=content, headers=alice)

    assert "not valid JSON" in problem(post(b"{not json"), 400)
    assert "not valid JSON" in problem(post(b"\xff\xfe\x00garbage"), 400)
    assert "not valid JSON" in problem(post('{"label": NaN}'), 400)
    assert "not valid JSON" in problem(post("[" * 100_000), 400)
    assert "not valid JSON" in problem(post('{"priority": 1' + "0" * 5000 + "}"), 400)
    assert "empty" in problem(post(b""), 400)
    assert "must be a JSON object" in problem(post("[1, 2]"), 400)
    assert "got a JSON string" in problem(post('"a spec"'), 400)
    assert "label" in problem(post(json.dumps({"steps": []})), 400)
    unknown = post(json.dumps(stamp_job(runner="no-such-runner")))
    assert "no-such-runner" in problem(unknown, 400)
    bad_param = post(json.dumps({"label": "demo", "steps": [
        {"runner": "stamp", "params": {"name": 7}}]}))
    assert "'name'" in problem(bad_param, 400)
    extra = post(json.dumps({"label": "demo", "steps": [
        {"runner": "stamp", "params": {"name": "x", "colour": "red"}}]}))
    assert "'colour'" in problem(extra, 400)
    lone_surrogate = post('{"label": "\\ud800", "steps": []}')
    assert lone_surrogate.status_code == 400
    assert api.cell.list() == []


def test_huge_job_bodies_are_refused_with_413(api: Api) -> None:
    alice = api.user("alice")
    huge = json.dumps({"label": "demo", "tags": ["x" * 100] * (3 * MAX_SPEC_BYTES // 100)})
    declared = api.client.post("/api/v1/jobs", content=huge, headers=alice)
    assert "limit" in problem(declared, 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        for start in range(0, len(huge), 65536):
            yield huge[start:start + 65536].encode()

    streamed = api.client.post("/api/v1/jobs", content=chunks(), headers=alice)
    assert "limit" in problem(streamed, 413)
    # Under the body limit but over the spec limit: the service's own 400.
    big = json.dumps({"label": "demo", "tags": [f"{i:0>150}" for i in range(8000)]})
    assert "the limit is" in problem(api.client.post("/api/v1/jobs", content=big,
                                                     headers=alice), 400)


def test_bad_queries_are_4xx_problems(api: Api) -> None:
    alice = api.user("alice")
    get = api.client.get
    assert "unknown job state 'done'" in problem(
        get("/api/v1/jobs", params={"state": "done"}, headers=alice), 400)
    for limit in ("0", "1001", "ten", "-1"):
        assert "limit" in problem(get("/api/v1/jobs", params={"limit": limit},
                                      headers=alice), 422)
    assert "offset" in problem(get("/api/v1/jobs", params={"offset": "-3"}, headers=alice),
                               422)
    assert "offset" in problem(get("/api/v1/jobs", params={"offset": str(10**30)},
                                   headers=alice), 422)
    assert "last_n" in problem(get("/api/v1/jobs/x/logs", params={"last_n": "-1"},
                                   headers=alice), 422)
    assert "no job with id 'nope'" in problem(get("/api/v1/jobs/nope", headers=alice), 404)
    assert "no route" in problem(get("/api/v1/nothing-here", headers=alice), 404)
    assert "not allowed" in problem(api.client.put("/api/v1/jobs", headers=alice), 405)


def test_cooldown_reasons_name_only_the_users_own_jobs(api: Api) -> None:
    api.register("oom", ["exit", "137"], params={"n": {"type": "integer"}})
    alice, bob = api.user("alice"), api.user("bob")
    job = submit(api, alice, {"label": "oom", "steps": [{"runner": "oom", "params": {"n": 1}}]})
    api.run_worker()
    assert api.cell.status(job)["state"] == "failed"
    (cooldown,) = api.cell.scheduler_status()["cooldowns"]
    assert job in cooldown["reason"]
    hers = api.client.get("/api/v1/scheduler", headers=alice).json()
    assert job in hers["cooldowns"][0]["reason"]
    his = api.client.get("/api/v1/scheduler", headers=bob)
    assert job not in his.text
    assert "<another owner's job>" in his.json()["cooldowns"][0]["reason"]
    assert his.json()["cooldowns"][0]["group"] == "oom"


def test_timestamps_are_datetime_isoformat() -> None:
    """The API's timestamps (``service.iso``, table-driven for speed) are exactly
    ``datetime.isoformat(timespec="milliseconds")`` in UTC with ``Z``: microseconds
    rounded half to even then truncated, clamped to years 1970..9999."""
    import random
    import struct
    from datetime import UTC, datetime

    from jobcell.service import iso

    def reference(t: float) -> str:
        t = min(max(t, 0.0), 253402300799.0)
        return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace(
            "+00:00", "Z")

    rng = random.Random(11)
    values = [0.0, -1.5, 1e300, float("inf"), float("-inf"), 253402300799.0,
              253402300798.9999996, 0.0005, 0.9999995, 0.9999994999, 1.0000005,
              86399.9999996, 951782400.0, 1_763_712_345.9009995]
    values += [rng.uniform(0, 4e9) for _ in range(20_000)]
    values += [int(rng.uniform(0, 4e9)) + rng.randrange(2_000_001) / 2e6    # half-micro ties
               for _ in range(20_000)]
    values += [struct.unpack("d", struct.pack("Q", rng.getrandbits(64)))[0]
               for _ in range(20_000)]
    for value in values:
        if value == value:    # NaN has no time
            assert iso(value) == reference(value), repr(value)
    assert iso(None) is None
