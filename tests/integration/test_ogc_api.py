"""OGC API - Processes over a real cell: processes, async jobs, results, dismiss."""

from __future__ import annotations

import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from integration_support import wait_for

from conftest import Api
from jobcell.server.ogc_models import (
    CONFORMANCE,
    JOB_DISMISSED,
    JOB_FAILED,
    NO_SUCH_JOB,
    NO_SUCH_PROCESS,
    REL_JOB_LIST,
    REL_PROCESSES,
    REL_RESULTS,
    RESULT_NOT_READY,
    SYNC_NOT_SUPPORTED,
    SYNC_REFUSAL,
)

OGC_TOOLS = '''
"""Python runners for the OGC tests."""
import time

def word_count(text, lang, context):
    (context.output_dir / "report.txt").write_text(f"{len(text.split())} words\\n")
    return {"words": len(text.split())}

def staged(context):
    return {p.name: p.stat().st_size for p in sorted(context.input_dir.iterdir())}

def sleepy(seconds):
    time.sleep(seconds)
    return {"slept": seconds}

def fail(message):
    raise ValueError(message)

def shout(text):
    return {"upper": text.upper()}
'''


@pytest.fixture
def ogc(api: Api, tmp_path: Path) -> Api:
    """The API with the OGC test runners registered."""
    (tmp_path / "ogc_tools.py").write_text(textwrap.dedent(OGC_TOOLS))

    def register(name: str, function: str, **fields: Any) -> None:
        api.cell.register_runner({"name": name, "python": f"ogc_tools:{function}",
                                  "python_path": [str(tmp_path)],
                                  **fields})

    register("word_count", "word_count", description="Count the words of a text.",
             version="2", params={"text": {"type": "string", "description": "the text"},
                                  "lang": {"type": "string", "default": "en"}},
             outputs=["report.txt"])
    register("staged", "staged")
    register("sleepy", "sleepy", params={"seconds": {"type": "number"}})
    register("fail", "fail", params={"message": {"type": "string"}})
    register("shout", "shout", plane="session", params={"text": {"type": "string"}})
    return api


def execute(api: Api, headers: dict[str, str], process: str, inputs: dict[str, Any],
            **body: Any) -> Any:
    return api.client.post(f"/processes/{process}/execution",
                           json={"inputs": inputs, **body}, headers=headers)


def test_landing_page_and_conformance_need_no_token(api: Api) -> None:
    landing = api.client.get("/")
    assert landing.status_code == 200
    rels = {link["rel"]: link["href"] for link in landing.json()["links"]}
    assert rels["service-desc"].endswith("/openapi.json")
    assert rels["service-doc"].endswith("/docs")
    assert rels[REL_PROCESSES].endswith("/processes")
    assert rels[REL_JOB_LIST].endswith("/jobs")
    assert any(href.endswith("/ui") for href in rels.values())
    conformance = api.client.get("/conformance").json()["conformsTo"]
    assert conformance == CONFORMANCE
    assert "http://www.opengis.net/spec/ogcapi-processes-1/1.0/conf/core" in conformance
    assert "http://www.opengis.net/spec/ogcapi-processes-1/1.0/conf/callback" in conformance


@pytest.mark.parametrize("method,path", [
    ("GET", "/processes"), ("GET", "/processes/word_count"),
    ("POST", "/processes/word_count/execution"), ("GET", "/jobs"),
    ("GET", "/jobs/x"), ("GET", "/jobs/x/results"), ("DELETE", "/jobs/x")])
def test_everything_else_needs_a_token(ogc: Api, method: str, path: str) -> None:
    answer = ogc.client.request(method, path, json={"inputs": {}})
    assert answer.status_code == 401
    assert answer.headers["content-type"] == "application/problem+json"
    bad = ogc.client.request(method, path, json={"inputs": {}},
                             headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401


def test_processes_are_the_runners(ogc: Api) -> None:
    me = ogc.user("ann")
    listed = {p["id"]: p for p in ogc.client.get("/processes", headers=me).json()["processes"]}
    assert set(listed) == {"word_count", "staged", "sleepy", "fail", "shout"}
    assert listed["word_count"]["jobControlOptions"] == ["async-execute", "dismiss"]
    assert listed["word_count"]["outputTransmission"] == ["value", "reference"]
    assert listed["word_count"]["version"] == "2"
    assert listed["word_count"]["description"] == "Count the words of a text."
    assert listed["shout"]["jobControlOptions"] == ["sync-execute"]

    described = ogc.client.get("/processes/word_count", headers=me).json()
    inputs = described["inputs"]
    assert inputs["text"]["schema"] == {"type": "string", "description": "the text"}
    assert (inputs["text"]["minOccurs"], inputs["text"]["maxOccurs"]) == (1, 1)
    assert inputs["lang"]["minOccurs"] == 0
    assert inputs["lang"]["schema"]["default"] == "en"
    assert inputs["files"]["minOccurs"] == 0
    assert inputs["files"]["schema"]["type"] == "object"
    assert set(described["outputs"]) == {"result", "report.txt"}
    assert described["outputs"]["report.txt"]["schema"]["contentMediaType"] == "text/plain"
    session = ogc.client.get("/processes/shout", headers=me).json()
    assert "files" not in session["inputs"]
    assert set(session["outputs"]) == {"result"}

    missing = ogc.client.get("/processes/ghost", headers=me)
    assert missing.status_code == 404
    assert missing.json()["type"] == NO_SUCH_PROCESS
    assert execute(ogc, me, "ghost", {}).json()["type"] == NO_SUCH_PROCESS


def test_async_execute_poll_and_results(ogc: Api) -> None:
    me = ogc.user("ann")
    answer = execute(ogc, me | {"Prefer": "respond-async"}, "word_count",
                     {"text": "one two three"})
    assert answer.status_code == 201, answer.text
    assert answer.headers["Preference-Applied"] == "respond-async"
    info = answer.json()
    job_id = info["jobID"]
    assert answer.headers["Location"].endswith(f"/jobs/{job_id}")
    assert (info["status"], info["processID"], info["type"]) == ("accepted", "word_count",
                                                                  "process")
    assert info["progress"] == 0
    status = ogc.cell.status(job_id)
    assert (status["label"], status["owner"]) == ("ogc", "ann")
    assert set(status["tags"]) == {"ogc", "process:word_count"}

    not_ready = ogc.client.get(f"/jobs/{job_id}/results", headers=me)
    assert not_ready.status_code == 404
    assert not_ready.json()["type"] == RESULT_NOT_READY

    ogc.run_worker()
    done = ogc.client.get(f"/jobs/{job_id}", headers=me).json()
    assert done["status"] == "successful", (done, ogc.cell.logs(job_id))
    assert done["progress"] == 100
    assert done["created"] and done["started"] and done["finished"] and done["updated"]
    results_link = next(link for link in done["links"] if link["rel"] == REL_RESULTS)
    assert results_link["href"].endswith(f"/jobs/{job_id}/results")

    results = ogc.client.get(f"/jobs/{job_id}/results", headers=me).json()
    assert results["result"] == {"words": 3}
    report = results["report.txt"]
    assert report["type"] == "text/plain"
    download = ogc.client.get(report["href"])       # the signed URL is the credential
    assert download.status_code == 200
    assert download.text == "3 words\n"

    listed = ogc.client.get("/jobs", headers=me).json()
    assert [j["jobID"] for j in listed["jobs"]] == [job_id]
    assert listed["jobs"][0]["status"] == "successful"
    assert any(link["rel"] == "self" for link in listed["links"])
    filtered = ogc.client.get("/jobs?status=running", headers=me).json()
    assert filtered["jobs"] == []
    by_process = ogc.client.get("/jobs?processID=word_count", headers=me).json()
    assert [j["jobID"] for j in by_process["jobs"]] == [job_id]


def test_no_preference_runs_async_and_uploaded_files_are_staged(ogc: Api) -> None:
    me = ogc.user("ann")
    digest = ogc.cell.upload(iter([b"hello ", b"world"]), owner="ann")["digest"]
    answer = execute(ogc, me, "staged", {"files": {"in.txt": digest}})
    assert answer.status_code == 201, answer.text
    assert "Preference-Applied" not in answer.headers
    ogc.run_worker()
    results = ogc.client.get(f"/jobs/{answer.json()['jobID']}/results", headers=me).json()
    assert results["result"] == {"in.txt": 11}

    other = ogc.user("bob")
    refused = execute(ogc, other, "staged", {"files": {"in.txt": digest}})
    assert refused.status_code == 400
    assert "not an upload of yours" in refused.json()["detail"]


@pytest.mark.parametrize("headers,body", [
    ({"Prefer": "respond-sync"}, {}),
    ({"Prefer": "wait=10"}, {}),
    ({}, {"mode": "sync"}),
])
def test_sync_execution_of_an_artifact_runner_is_refused(
        ogc: Api, headers: dict[str, str], body: dict[str, Any]) -> None:
    me = ogc.user("ann")
    answer = execute(ogc, me | headers, "word_count", {"text": "a"}, **body)
    assert answer.status_code == 400
    problem = answer.json()
    assert problem["type"] == SYNC_NOT_SUPPORTED
    assert problem["detail"].startswith(SYNC_REFUSAL)
    assert ogc.cell.list() == []                   # nothing was queued


def test_session_runner_runs_synchronously(ogc: Api) -> None:
    me = ogc.user("ann")
    answer = execute(ogc, me | {"Prefer": "respond-async"}, "shout", {"text": "hi"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"result": {"upper": "HI"}}
    assert "Preference-Applied" not in answer.headers
    raw = execute(ogc, me, "shout", {"text": "hi"}, response="raw")
    assert raw.json() == {"upper": "HI"}
    assert ogc.cell.list() == []
    bad = execute(ogc, me, "shout", {"text": 3})
    assert bad.status_code == 400
    assert "expected string" in bad.json()["detail"]


def test_failed_session_run_is_a_clear_exception(ogc: Api, tmp_path: Path) -> None:
    ogc.cell.register_runner({"name": "crash", "python": "ogc_tools:fail",
                              "python_path": [str(tmp_path)], "plane": "session",
                              "params": {"message": {"type": "string"}}})
    answer = execute(ogc, ogc.user("ann"), "crash", {"message": "no such band"})
    assert answer.status_code == 424
    problem = answer.json()
    assert problem["type"] == JOB_FAILED
    assert "no such band" in problem["detail"]


def test_bad_inputs_are_400_with_the_services_detail(ogc: Api) -> None:
    me = ogc.user("ann")
    missing = execute(ogc, me, "word_count", {})
    assert missing.status_code == 400
    assert "missing required param 'text'" in missing.json()["detail"]
    unknown = execute(ogc, me, "word_count", {"text": "a", "colour": "red"})
    assert "unknown param 'colour'" in unknown.json()["detail"]
    outputs = execute(ogc, me, "word_count", {"text": "a"}, outputs={"nope": {}})
    assert outputs.status_code == 400
    assert "no output 'nope'" in outputs.json()["detail"]
    typo = ogc.client.post("/processes/word_count/execution", headers=me,
                           json={"input": {"text": "a"}})
    assert typo.status_code == 422
    callback = execute(ogc, me, "word_count", {"text": "a"},
                       subscriber={"successUri": "ftp://example.org/x"})
    assert callback.status_code == 400
    assert "subscriber.successUri" in callback.json()["detail"]
    assert ogc.cell.list() == []                   # nothing was queued


def test_failed_job_results_and_status(ogc: Api) -> None:
    me = ogc.user("ann")
    job_id = execute(ogc, me, "fail", {"message": "bad raster"}).json()["jobID"]
    ogc.run_worker()
    info = ogc.client.get(f"/jobs/{job_id}", headers=me).json()
    assert info["status"] == "failed"
    assert "bad raster" in info["message"]
    results = ogc.client.get(f"/jobs/{job_id}/results", headers=me)
    assert results.status_code == 424
    assert results.json()["type"] == JOB_FAILED
    assert "bad raster" in results.json()["detail"]


def test_dismiss_a_running_job(ogc: Api) -> None:
    me = ogc.user("ann")
    job_id = execute(ogc, me, "sleepy", {"seconds": 60}).json()["jobID"]
    worker = threading.Thread(target=ogc.run_worker, daemon=True)
    worker.start()
    wait_for(lambda: ogc.client.get(f"/jobs/{job_id}", headers=me).json()["status"]
             == "running", 30, "the job to run")
    dismissed = ogc.client.delete(f"/jobs/{job_id}", headers=me)
    assert dismissed.status_code == 200
    assert dismissed.json()["status"] == "dismissed"
    worker.join(30)
    assert ogc.cell.status(job_id)["state"] == "cancelled"
    results = ogc.client.get(f"/jobs/{job_id}/results", headers=me)
    assert results.status_code == 410
    assert results.json()["type"] == JOB_DISMISSED
    again = ogc.client.delete(f"/jobs/{job_id}", headers=me)   # a finished job: its status
    assert again.json()["status"] == "dismissed"


def test_dismiss_a_queued_job_and_a_finished_one(ogc: Api,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from jobcell.server import ogc as routes

    monkeypatch.setattr(routes, "DISMISS_WAIT_S", 0.2)
    me = ogc.user("ann")
    queued = execute(ogc, me, "sleepy", {"seconds": 0}).json()["jobID"]
    answer = ogc.client.delete(f"/jobs/{queued}", headers=me).json()
    # No worker has taken the request yet: still accepted, and it says so.
    assert (answer["status"], answer["message"]) == ("accepted", "dismissal requested")
    ogc.run_worker()
    assert ogc.client.get(f"/jobs/{queued}", headers=me).json()["status"] == "dismissed"

    finished = execute(ogc, me, "word_count", {"text": "done"}).json()["jobID"]
    ogc.run_worker()
    kept = ogc.client.delete(f"/jobs/{finished}", headers=me)
    assert kept.status_code == 200
    assert kept.json()["status"] == "successful"      # finished jobs keep their results
    assert ogc.client.get(f"/jobs/{finished}/results", headers=me).status_code == 200


def test_jobs_are_owner_scoped(ogc: Api) -> None:
    ann, bob = ogc.user("ann"), ogc.user("bob")
    job_id = execute(ogc, ann, "word_count", {"text": "mine"}).json()["jobID"]
    for method, path in (("GET", f"/jobs/{job_id}"), ("GET", f"/jobs/{job_id}/results"),
                         ("DELETE", f"/jobs/{job_id}")):
        answer = ogc.client.request(method, path, headers=bob)
        assert answer.status_code == 404, (method, path)
        assert answer.json()["type"] == NO_SUCH_JOB
    assert ogc.client.get("/jobs", headers=bob).json()["jobs"] == []
    assert ogc.cell.status(job_id)["state"] == "queued"     # bob's DELETE did nothing
    unknown = ogc.client.get("/jobs/ghost", headers=ann)
    assert unknown.status_code == 404
    assert unknown.json()["type"] == NO_SUCH_JOB


def test_openapi_documents_the_ogc_routes(api: Api) -> None:
    schema = api.client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/", "/conformance", "/processes", "/processes/{process_id}",
                 "/processes/{process_id}/execution", "/jobs", "/jobs/{job_id}",
                 "/jobs/{job_id}/results"):
        assert path in paths, path
    execution = paths["/processes/{process_id}/execution"]["post"]["responses"]
    assert {"200", "201", "400", "401", "404"} <= set(execution)
    assert "404" in paths["/jobs/{job_id}/results"]["get"]["responses"]
    assert "StatusInfo" in schema["components"]["schemas"]


def test_fuzzing_the_ogc_routes_finds_no_server_errors_or_schema_violations(ogc: Api) -> None:
    """schemathesis over every OGC operation with a valid token, positive and negative
    cases, plus cases aimed at a real job and real processes."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    me = ogc.user("fuzzer")
    job_id = execute(ogc, me, "word_count", {"text": "fuzz me"}).json()["jobID"]
    ogc.run_worker()
    loaded = schemathesis.openapi.from_asgi("/openapi.json", ogc.app)
    subset = loaded.include(path_regex=r"^/(conformance|processes|jobs)?($|/)")
    operations = [result.ok() for result in subset.get_all_operations()]
    assert {op.label for op in operations} >= {
        "GET /", "GET /conformance", "GET /processes", "GET /processes/{process_id}",
        "POST /processes/{process_id}/execution", "GET /jobs", "GET /jobs/{job_id}",
        "GET /jobs/{job_id}/results", "DELETE /jobs/{job_id}"}
    plans: list[tuple[Any, Any, dict[str, Any]]] = []
    for operation in operations:
        public = operation.label in ("GET /", "GET /conformance")   # nothing to get wrong
        plans += [(operation, mode, {}) for mode in GenerationMode
                  if mode == GenerationMode.POSITIVE or not public]
        if "{job_id}" in operation.path:
            plans.append((operation, GenerationMode.POSITIVE,
                          {"path_parameters": {"job_id": job_id}}))
        if "{process_id}" in operation.path:
            for process in ("word_count", "shout"):
                plans.append((operation, GenerationMode.POSITIVE,
                              {"path_parameters": {"process_id": process}}))
                if operation.method.upper() == "POST":
                    plans.append((operation, GenerationMode.POSITIVE, {
                        "path_parameters": {"process_id": process},
                        "body": {"inputs": {"text": "a b"}}}))
    failures: list[str] = []
    seen: dict[str, set[int]] = {}
    for operation, mode, fixed in plans:

        @settings(max_examples=15, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode, **fixed))
        def check(case: Any) -> None:
            response = case.call_and_validate(headers=me, checks=checks)
            seen.setdefault(case.operation.label, set()).add(response.status_code)

        try:
            check()
        except Exception as exc:   # collect every operation's failures, then report them
            failures.append(f"{operation.label} ({mode.value}, {fixed}): {exc}")
    assert not failures, "\n\n".join(failures)
    for label in ("GET /jobs/{job_id}", "GET /jobs/{job_id}/results",
                  "GET /processes/{process_id}", "POST /processes/{process_id}/execution"):
        assert 200 in seen[label], (label, seen[label])
    assert 201 in seen["POST /processes/{process_id}/execution"]
