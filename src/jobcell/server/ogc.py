"""OGC API - Processes - Part 1: Core (1.0), JSON: every runner a process.

- ``GET /`` and ``GET /conformance`` are public; everything else needs a bearer token
  and sees only the caller's jobs (another user's job is ``no-such-job``).
- Artifact-plane runners are async-only (``jobControlOptions: [async-execute,
  dismiss]``): an execution runs as a one-step job (label ``ogc``, tags ``ogc`` and
  ``process:<id>``) and answers ``201`` + ``Location`` + statusInfo. A request that
  asks for synchronous execution (``"mode": "sync"``, ``Prefer: respond-sync`` or
  ``Prefer: wait=N`` without ``respond-async``) is refused with ``400``
  ``urn:jobcell:ogc:sync-not-supported``.
- Session-plane runners are sync-only: they run inline and answer ``200`` with the
  results document (``response: raw``: the JSON value itself), whatever the
  preference (OGC: a process that runs only synchronously answers synchronously).
- An identical execution by the same user while the first is active or succeeded is
  answered with that job (jobcell's whole-job deduplication), unless it names
  subscriber callbacks: then it gets a job of its own (whose step may be a cache hit).
- ``DELETE /jobs/{id}`` dismisses: an active job is cancelled (waiting up to a few
  seconds for the worker) and its statusInfo answered; a finished job is left as it
  is and its statusInfo answered (a successful job keeps its results).
- ``GET /jobs/{id}/results``: every output of a successful job (the ``outputs``
  selection of the execute request applies to synchronous answers only).

Exception types: see :mod:`jobcell.server.ogc_models`.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import JSONResponse

from jobcell import subscribers
from jobcell.errors import NotFoundError, SpecError
from jobcell.model.runner import RunnerDefinition
from jobcell.server.deps import CellDep, User, output_links
from jobcell.server.ogc_models import (
    CONFORMANCE,
    FILES_INPUT,
    INVALID_INPUT,
    JOB_DISMISSED,
    JOB_FAILED,
    JOB_STATE,
    JSON,
    NO_SUCH_JOB,
    NO_SUCH_PROCESS,
    REL_CONFORMANCE,
    REL_JOB_LIST,
    REL_PROCESSES,
    RESULT_NOT_READY,
    SYNC_NOT_SUPPORTED,
    SYNC_REFUSAL,
    VALUE_OUTPUT,
    Conformance,
    ExecuteRequest,
    JobList,
    LandingPage,
    Link,
    OgcStatus,
    Process,
    ProcessList,
    StatusInfo,
    describe_process,
    process_summary,
    results_document,
    status_info,
)
from jobcell.server.problems import ProblemError, problem_responses
from jobcell.service import Cell

router = APIRouter(tags=["OGC API - Processes"])
OGC_LABEL = "ogc"
DISMISS_WAIT_S = 5.0
MAX_STDERR_LINES = 20
_NOT_READY = {"queued": "accepted (queued)", "running": "running"}

JobId = Annotated[str, Path(max_length=100, description="A job id.")]
ProcessId = Annotated[str, Path(max_length=100, description="A process (runner) name.")]


def base_url(request: Request) -> str:
    """The server's URL as the client sees it (behind a proxy: its forwarded host)."""
    return str(request.base_url).rstrip("/")


def _runner(cell: Cell, process_id: str) -> RunnerDefinition:
    try:
        return cell.runner(process_id)
    except NotFoundError:
        raise ProblemError(404, f"no process {process_id!r} (see GET /processes)",
                           type_=NO_SUCH_PROCESS) from None


def _status(cell: Cell, job_id: str, user: str) -> dict[str, Any]:
    try:
        return cell.status(job_id, owner=user)
    except NotFoundError:
        raise ProblemError(404, f"no job {job_id!r} of yours (see GET /jobs)",
                           type_=NO_SUCH_JOB) from None


def _invalid(detail: str) -> ProblemError:
    return ProblemError(400, detail, type_=INVALID_INPUT, title="Invalid input")


# -- landing page and conformance (public)
@router.get("/", response_model=LandingPage, summary="Landing page",
            response_model_exclude_none=True)
def landing(request: Request) -> LandingPage:
    base = base_url(request)
    return LandingPage(
        title="jobcell", description="A durable job runtime: OGC API - Processes (every "
        "registered runner is a process), a REST API under /api/v1 and a web dashboard.",
        links=[Link(href=f"{base}/", rel="self", type=JSON, title="this document"),
               Link(href=f"{base}/openapi.json", rel="service-desc",
                    type="application/vnd.oai.openapi+json;version=3.0",
                    title="the API definition"),
               Link(href=f"{base}/docs", rel="service-doc", type="text/html",
                    title="the API documentation"),
               Link(href=f"{base}/conformance", rel=REL_CONFORMANCE, type=JSON,
                    title="conformance classes"),
               Link(href=f"{base}/processes", rel=REL_PROCESSES, type=JSON,
                    title="processes"),
               Link(href=f"{base}/jobs", rel=REL_JOB_LIST, type=JSON, title="jobs"),
               Link(href=f"{base}/api/v1/runners", rel="service", type=JSON,
                    title="the jobcell REST API"),
               Link(href=f"{base}/ui", rel="alternate", type="text/html",
                    title="the jobs dashboard")])


@router.get("/conformance", response_model=Conformance, summary="Conformance classes")
def conformance() -> Conformance:
    return Conformance(conformsTo=CONFORMANCE)


# -- processes
@router.get("/processes", response_model=ProcessList, response_model_exclude_none=True,
            summary="Every runner as a process", responses=problem_responses(401))
def processes(request: Request, cell: CellDep, _user: User) -> ProcessList:
    base = base_url(request)
    runners = cell.runners()
    return ProcessList(
        processes=[process_summary(runners[name], base) for name in sorted(runners)],
        links=[Link(href=f"{base}/processes", rel="self", type=JSON)])


@router.get("/processes/{process_id}", response_model=Process, response_model_by_alias=True,
            response_model_exclude_none=True, summary="A process description",
            responses=problem_responses(401, 404, 422))
def process(process_id: ProcessId, request: Request, cell: CellDep, _user: User) -> Process:
    return describe_process(_runner(cell, process_id), base_url(request))


def wants_sync(body: ExecuteRequest, prefer: str | None) -> tuple[bool, bool]:
    """``(sync asked explicitly, respond-async asked)`` from the body and ``Prefer``.

    ``Prefer`` (RFC 7240) is a comma-separated list of preferences, each
    ``name[=value]`` with optional ``;`` parameters. ``wait=N`` without
    ``respond-async`` asks for a synchronous answer.
    """
    names = set()
    for item in (prefer or "").split(","):
        token = item.split(";", 1)[0].strip()
        if token:
            names.add(token.split("=", 1)[0].strip().lower())
    asked_async = "respond-async" in names
    asked_sync = body.mode == "sync" or "respond-sync" in names or \
        ("wait" in names and not asked_async)
    return asked_sync, asked_async


_EXECUTE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "A session-plane (sync-only) process ran: the results document "
                         "(or, with response 'raw', the JSON value)",
          "content": {JSON: {"schema": {}}}},
    201: {"model": StatusInfo, "description": "The job was created (artifact-plane "
                                              "processes run asynchronously)",
          "headers": {"Location": {"description": "the job's status URL",
                                   "schema": {"type": "string"}},
                      "Preference-Applied": {"description": "respond-async when asked",
                                             "schema": {"type": "string"}}}},
    **problem_responses(400, 401, 404, 409, 422, 424, 429, 503)}


@router.post("/processes/{process_id}/execution", response_model=None,
             summary="Execute a process", responses=_EXECUTE_RESPONSES, status_code=201)
def execute(process_id: ProcessId, body: ExecuteRequest, request: Request, cell: CellDep,
            user: User, prefer: Annotated[str | None, Header(
                description="RFC 7240 preferences: respond-async, wait=N")] = None
            ) -> JSONResponse:
    runner = _runner(cell, process_id)
    asked_sync, asked_async = wants_sync(body, prefer)
    described = describe_process(runner, base_url(request))
    unknown = sorted(set(body.outputs or ()) - set(described.outputs))
    if unknown:
        raise _invalid(f"process {process_id!r} has no output {unknown[0]!r} (outputs: "
                       f"{', '.join(described.outputs)})")
    if runner.plane == "session":
        return _execute_session(cell, runner, body)
    if asked_sync:
        raise ProblemError(400, f"{SYNC_REFUSAL}: process {process_id!r} runs only "
                                "asynchronously (send 'Prefer: respond-async' or no "
                                "preference, and no 'mode: sync')",
                           type_=SYNC_NOT_SUPPORTED, title="Synchronous execution refused")
    uris = body.subscriber.by_kind() if body.subscriber is not None else {}
    for kind, uri in uris.items():   # checked before anything is queued
        if uri is not None:
            try:
                subscribers.check_uri(uri, f"subscriber.{kind}Uri")
            except SpecError as exc:
                raise _invalid(str(exc)) from None
    # An execution with callbacks gets a job of its own (its steps may still be step-cache
    # hits), so that its callbacks are never merged into an identical earlier execution.
    job_id = _submit(cell, runner, body, user, dedup=not any(uris.values()))
    if uris:
        subscribers.subscribe(cell, job_id, uris, owner=user, base_url=base_url(request))
    info = status_info(cell.status(job_id, owner=user), base_url(request))
    headers = {"Location": f"{base_url(request)}/jobs/{job_id}"}
    if asked_async:
        headers["Preference-Applied"] = "respond-async"
    return JSONResponse(info.model_dump(mode="json", exclude_none=True), status_code=201,
                        headers=headers)


def _submit(cell: Cell, runner: RunnerDefinition, body: ExecuteRequest, user: str,
            dedup: bool) -> str:
    params = dict(body.inputs)
    files: Any = {}
    if FILES_INPUT not in runner.params:
        files = params.pop(FILES_INPUT, None) or {}
        if not isinstance(files, dict):
            raise _invalid(f"input {FILES_INPUT!r} must be an object of file name -> "
                           f"upload digest, got {type(files).__name__}")
    step: dict[str, Any] = {"runner": runner.name, "params": params}
    if files:
        step["files"] = files
    spec = {"label": OGC_LABEL, "tags": [OGC_LABEL, f"process:{runner.name}"],
            "steps": [step]}
    try:
        return cell.submit(spec, owner=user, dedup=dedup).job_id
    except SpecError as exc:
        raise _invalid(str(exc)) from None


def _execute_session(cell: Cell, runner: RunnerDefinition,
                     body: ExecuteRequest) -> JSONResponse:
    if body.subscriber is not None:
        raise _invalid(f"process {runner.name!r} runs synchronously: subscriber callbacks "
                       "apply to asynchronous jobs only")
    if FILES_INPUT in body.inputs and FILES_INPUT not in runner.params:
        raise _invalid(f"process {runner.name!r} runs synchronously and takes no uploaded "
                       "files")
    try:
        answer = cell.run_session(runner.name, dict(body.inputs))
    except SpecError as exc:
        raise _invalid(str(exc)) from None
    if not answer["succeeded"]:
        raise ProblemError(424, f"process {runner.name!r} failed: {answer['error']}",
                           type_=JOB_FAILED, title="Execution failed",
                           exit_code=answer["exit_code"],
                           stderr=answer["stderr"][-MAX_STDERR_LINES:])
    if body.response == "raw":
        return JSONResponse(answer["value"], status_code=200)
    return JSONResponse({VALUE_OUTPUT: answer["value"]}, status_code=200)


# -- jobs
@router.get("/jobs", response_model=JobList, response_model_exclude_none=True,
            summary="Your jobs, newest first", responses=problem_responses(401, 422))
def jobs(request: Request, cell: CellDep, user: User,
         limit: Annotated[int, Query(ge=1, le=1000)] = 100,
         offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
         status: Annotated[OgcStatus | None, Query()] = None,
         processID: Annotated[str | None, Query(max_length=200)] = None,
         ) -> JobList:
    base = base_url(request)
    rows = cell.list(owner=user, limit=limit, offset=offset,
                     state=JOB_STATE[status] if status else None,
                     tag=f"process:{processID}" if processID else None)
    infos = []
    for row in rows:
        try:
            infos.append(status_info(cell.status(row["job_id"], owner=user), base))
        except NotFoundError:
            continue    # removed (jobcell gc) between the list and its status
    filters = {k: v for k, v in (("status", status), ("processID", processID)) if v}

    def page(start: int) -> str:
        return f"{base}/jobs?" + urlencode({"limit": limit, "offset": start, **filters})

    links = [Link(href=page(offset), rel="self", type=JSON)]
    if len(rows) == limit:
        links.append(Link(href=page(offset + limit), rel="next", type=JSON))
    return JobList(jobs=infos, links=links)


@router.get("/jobs/{job_id}", response_model=StatusInfo, response_model_exclude_none=True,
            summary="A job's status", responses=problem_responses(401, 404, 422))
def job(job_id: JobId, request: Request, cell: CellDep, user: User) -> StatusInfo:
    return status_info(_status(cell, job_id, user), base_url(request))


@router.get("/jobs/{job_id}/results", response_model=dict[str, Any],
            summary="A successful job's results",
            responses=problem_responses(401, 404, 410, 422, 424))
def results(job_id: JobId, request: Request, cell: CellDep, user: User) -> dict[str, Any]:
    status = _status(cell, job_id, user)
    state = status["state"]
    if state in ("queued", "running"):
        raise ProblemError(404, f"job {job_id} is {_NOT_READY[state]}; its results are "
                                "not ready yet", type_=RESULT_NOT_READY,
                           title="Result not ready")
    if state == "failed":
        reason = status["error"] or "no reason was recorded"
        raise ProblemError(424, f"job {job_id} failed: {reason}", type_=JOB_FAILED,
                           title="Job failed")
    if state == "cancelled":
        raise ProblemError(410, f"job {job_id} was dismissed and has no results",
                           type_=JOB_DISMISSED, title="Job dismissed")
    result = cell.result(job_id, owner=user)
    links = output_links(request, job_id, result["outputs"])
    return results_document(result, links, single_step=len(status["steps"]) == 1)


@router.delete("/jobs/{job_id}", response_model=StatusInfo, response_model_exclude_none=True,
               summary="Dismiss a job",
               responses=problem_responses(401, 404, 422, 503))
def dismiss(job_id: JobId, request: Request, cell: CellDep, user: User) -> StatusInfo:
    status = _status(cell, job_id, user)
    if status["state"] in ("queued", "running"):
        cell.cancel(job_id, owner=user, wait_s=DISMISS_WAIT_S)
        status = _status(cell, job_id, user)
    return status_info(status, base_url(request))
