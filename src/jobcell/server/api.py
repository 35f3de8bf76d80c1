"""The REST API under ``/api/v1``: the service API over HTTP, owner-scoped.

Every route needs ``Authorization: Bearer <token>``. A user sees only their own jobs:
another user's job id answers 404 exactly like an unknown one. Responses mirror the
CLI's ``--json`` documents, except that outputs are signed download links, never
server paths. Admin routes (``/api/v1/admin/...``) also need the ``X-Admin-Key`` header.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import weakref
from typing import Annotated, Any

import anyio
import anyio.from_thread
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from jobcell.errors import NotFoundError
from jobcell.model.params import params_json_schema
from jobcell.model.spec import MAX_SPEC_BYTES, JobSpec
from jobcell.server import api_models as m
from jobcell.server.deps import Admin, CellDep, User, get_cell, output_links
from jobcell.server.problems import ProblemError, problem_responses
from jobcell.service import Cell
from jobcell.uploads import UploadTooLargeError, too_large

PREFIX = "/api/v1"
# A spec's canonical JSON may be 1 MiB; the raw body may carry indentation on top.
MAX_SPEC_BODY = 2 * MAX_SPEC_BYTES
UPLOAD_BATCH = 1024 * 1024      # bytes handed to the writer thread at a time
UPLOAD_IDLE_S = 60.0            # an upload that sends nothing this long is dropped
# Upload disk writes use threads of their own, never the pool the sync routes share.
UPLOAD_THREADS = "uploads", 4
# Job lists read the database in a few threads of their own: under many concurrent lists,
# fewer threads stepping SQLite contend less for the GIL (measured: benchmarks/README.md).
LIST_THREADS = "lists", 4
_LIMITERS: weakref.WeakKeyDictionary[Any, dict[str, anyio.CapacityLimiter]] = \
    weakref.WeakKeyDictionary()


def _limiter(kind: tuple[str, int]) -> anyio.CapacityLimiter:
    """The event loop's own limiter of ``kind`` (a limiter wakes waiters on the loop it
    was first used on: one per loop, e.g. for apps served on several loops)."""
    import asyncio

    limiters = _LIMITERS.setdefault(asyncio.get_running_loop(), {})
    name, threads = kind
    if name not in limiters:
        limiters[name] = anyio.CapacityLimiter(threads)
    return limiters[name]
CANCEL_WAIT_S = 0.5             # how long DELETE waits for the cancel to take effect
MAX_OFFSET = 2**53              # keeps offsets and sequence numbers within SQLite's range
JOB_ID_PATTERN = re.compile(r"\b[0-9a-f]{11,16}-[0-9a-f]{12}\b")   # see new_job_id
STATE_HELP = "queued, running, succeeded, failed or cancelled"

router = APIRouter(prefix=PREFIX)

JobId = Annotated[str, Path(max_length=100, description="A job id.")]
Label = Annotated[str | None, Query(max_length=200, description="Only jobs with this label.")]
State = Annotated[str | None, Query(max_length=40, description=f"Only jobs in this state: "
                                                               f"{STATE_HELP}.")]
Tag = Annotated[str | None, Query(max_length=200, description="Only jobs with this tag.")]
Limit = Annotated[int, Query(ge=1, le=1000, description="Page size.")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Jobs to skip.")]


def _inline_refs(schema: Any, defs: dict[str, Any]) -> Any:
    """A JSON Schema with its local ``$defs`` references written out in place."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline_refs(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline_refs(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline_refs(v, defs) for v in schema]
    return schema


def _job_spec_schema() -> dict[str, Any]:
    schema = JobSpec.model_json_schema()
    return _inline_refs(schema, schema.get("$defs", {}))  # type: ignore[no-any-return]


SPEC_BODY = {"requestBody": {"required": True, "description": (
    "A job spec, as `jobcell submit` takes it: a `label`, and `steps` (in order) or a "
    "`pipeline` (a DAG: nodes with `id` and `inputs`). A node may name uploaded files "
    "with `files: {name: digest}`. The service validates it; bodies over "
    f"{MAX_SPEC_BODY} bytes are refused with 413."),
    "content": {"application/json": {"schema": _job_spec_schema()}}}}
TAG_CANCEL_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": m.TagCancel.model_json_schema()}}}}
UPLOAD_BODY = {"requestBody": {"required": True, "description": (
    "The raw bytes of one input file (streamed to disk; limit: the cell's upload_max_mb)."),
    "content": {"application/octet-stream": {"schema": {"type": "string",
                                                        "format": "binary"}}}}}


# -- request bodies
def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length", "")
    return int(value) if value.isdigit() and len(value) < 20 else None


async def _read_limited(request: Request, limit: int, what: str) -> bytes:
    """The whole request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = _declared_length(request)
    if declared is not None and declared > limit:
        raise ProblemError(413, f"{what} is {declared} bytes; the limit is {limit}")
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ProblemError(413, f"{what} is larger than the limit of {limit} bytes")
            parts.append(chunk)
    except ClientDisconnect:
        raise ProblemError(400, f"the client disconnected while sending {what}") from None
    return b"".join(parts)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def _json_object(request: Request, limit: int, what: str) -> dict[str, Any]:
    """The request body parsed as one JSON object; anything else is a 4xx problem."""
    body = await _read_limited(request, limit, what)
    if not body.strip():
        raise ProblemError(400, f"the request body is empty; send {what} as a JSON object")
    try:
        data = json.loads(body, parse_constant=_no_constants)
    except RecursionError:
        raise ProblemError(400, "the request body is not valid JSON: nested too deeply") \
            from None
    except ValueError as exc:   # JSONDecodeError, bad UTF-8, a huge integer
        raise ProblemError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProblemError(400, f"the request body must be a JSON object ({what}), got "
                                f"a JSON {_json_kind(data)}")
    return data


async def job_spec_body(request: Request) -> dict[str, Any]:
    """The job spec: a JSON object (the service validates it)."""
    return await _json_object(request, MAX_SPEC_BODY, "a job spec")


async def tag_cancel_body(request: Request) -> m.TagCancel:
    """The body of a cancel by tag."""
    data = await _json_object(request, 64 * 1024, "a cancel request")
    try:
        return m.TagCancel.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


def _json_kind(value: Any) -> str:
    kinds = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


# -- jobs
@router.post("/jobs", status_code=201, response_model=m.SubmitAnswer, tags=["jobs"],
             summary="Submit a job", openapi_extra=SPEC_BODY,
             responses=problem_responses(400, 401, 413, 429, 503))
def submit_job(response: Response, user: User, cell: CellDep,
               spec: Annotated[dict[str, Any], Depends(job_spec_body)]) -> dict[str, Any]:
    """Validate and queue a job owned by the signed-in user. An identical job of theirs
    that is queued, running or succeeded is reused (``deduplicated: true``)."""
    result = cell.submit(spec, owner=user)
    response.headers["Location"] = f"{PREFIX}/jobs/{result.job_id}"
    return result.to_dict()


# What JSONResponse writes (compact, UTF-8 unescaped, no NaN).
_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _page(cell: Cell, *, owner: str | None, label: str | None, state: str | None,
          tag: str | None, limit: int, offset: int) -> Response:
    """A :class:`m.JobPage` as JSON, serialised here: the summaries the service builds
    already have the model's types and key order, so FastAPI's validation of a hundred
    jobs against the response model (which a returned Response skips) would only cost
    time. ``response_model`` stays on the routes for the OpenAPI document."""
    rows = cell.list(label=label, state=state, tag=tag, owner=owner, limit=limit + 1,
                     offset=offset)
    more = len(rows) > limit
    page = {"jobs": rows[:limit], "limit": limit, "offset": offset,
            "next_offset": offset + limit if more else None}
    return Response(_JSON_ENCODER.encode(page).encode("utf-8"), media_type="application/json")


async def _cell_on_loop(request: Request) -> Cell:
    """The cell, as :data:`CellDep` gives it, without the worker-thread round trip that
    FastAPI makes for every plain ``def`` dependency."""
    return get_cell(request)


CellOnLoop = Annotated[Cell, Depends(_cell_on_loop)]


async def _page_in_thread(cell: Cell, **query: Any) -> Response:
    """:func:`_page` in one of the few threads of the list limiter (the list routes are async:
    no thread of the shared pool for the route itself)."""
    return await anyio.to_thread.run_sync(functools.partial(_page, cell, **query),
                                          limiter=_limiter(LIST_THREADS))


@router.get("/jobs", response_model=m.JobPage, tags=["jobs"], summary="List your jobs",
            responses=problem_responses(400, 401, 422))
async def list_jobs(user: User, cell: CellOnLoop, label: Label = None, state: State = None,
                    tag: Tag = None, limit: Limit = 100, offset: Offset = 0) -> Response:
    """The signed-in user's jobs, newest first, filtered by label, state and tag."""
    return await _page_in_thread(cell, owner=user, label=label, state=state, tag=tag,
                                 limit=limit, offset=offset)


@router.get("/jobs/{job_id}", response_model=m.JobStatus, tags=["jobs"],
            summary="A job's status", responses=problem_responses(401, 404, 422))
def job_status(job_id: JobId, user: User, cell: CellDep) -> dict[str, Any]:
    """The job's state and every step's state, attempt and exit code (the document of
    ``jobcell status --json``)."""
    return cell.status(job_id, owner=user)


@router.get("/jobs/{job_id}/result", response_model=m.JobResult, tags=["jobs"],
            summary="A job's result", responses=problem_responses(401, 404, 422))
def job_result(job_id: JobId, request: Request, user: User, cell: CellDep) -> dict[str, Any]:
    """Each finished step's JSON value, the final value, and the outputs with fresh
    signed download URLs."""
    result = cell.result(job_id, owner=user)
    result["outputs"] = output_links(request, job_id, result["outputs"])
    return result


@router.get("/jobs/{job_id}/logs", response_model=m.JobLogs, tags=["jobs"],
            summary="A job's log tails", responses=problem_responses(401, 404, 422))
def job_logs(job_id: JobId, user: User, cell: CellDep,
             last_n: Annotated[int, Query(ge=0, le=10_000,
                                          description="Lines per stream.")] = 50,
             step: Annotated[str | None, Query(max_length=200,
                                               description="Only this step.")] = None,
             ) -> dict[str, Any]:
    """The last lines of stdout and stderr of each step's latest attempt."""
    return cell.logs(job_id, step=step, last_n=last_n, owner=user)


@router.get("/jobs/{job_id}/events", response_model=list[m.JobEvent], tags=["jobs"],
            summary="A job's events", responses=problem_responses(401, 404, 422))
def job_events(job_id: JobId, user: User, cell: CellDep,
               after_seq: Annotated[int, Query(ge=0, le=MAX_OFFSET, description=(
                   "Only events after this sequence number."))] = 0) -> list[dict[str, Any]]:
    """The job's events, oldest first."""
    return cell.events(job_id, owner=user, after_seq=after_seq)


@router.get("/jobs/{job_id}/outputs", response_model=list[m.OutputLink], tags=["jobs"],
            summary="A job's output files", responses=problem_responses(401, 404, 422))
def job_outputs(job_id: JobId, request: Request, user: User,
                cell: CellDep) -> list[dict[str, Any]]:
    """Every output file with size, BLAKE3 digest and a fresh signed download URL."""
    return output_links(request, job_id, cell.outputs(job_id, owner=user))


@router.delete("/jobs/{job_id}", response_model=m.CancelAnswer, tags=["jobs"],
               summary="Cancel a job", responses=problem_responses(401, 404, 422, 503))
def cancel_job(job_id: JobId, user: User, cell: CellDep) -> dict[str, Any]:
    """Ask the worker to cancel the job: its running steps are stopped, the rest never
    start. Answers at once with the state reached so far."""
    return cell.cancel(job_id, owner=user, wait_s=CANCEL_WAIT_S)


# -- runners and the cell
def runner_info(cell: Cell, name: str) -> dict[str, Any]:
    """A runner as clients see it: no command, environment, paths or source file."""
    r = cell.runner(name)
    return {"name": r.name, "version": r.version, "plane": r.plane,
            "description": r.description, "params": params_json_schema(r.params),
            "outputs": list(r.outputs), "resources": r.resources.model_dump(),
            "profiles": [p.model_dump() for p in r.profiles], "executor": r.executor,
            "cacheable": r.cacheable, "hash": r.definition_hash()}


@router.get("/runners", response_model=m.RunnerList, tags=["runners"],
            summary="The registered runners", responses=problem_responses(401))
def list_runners(user: User, cell: CellDep) -> dict[str, Any]:
    """Every runner a job may name, with its params as JSON Schema."""
    return {"runners": [runner_info(cell, name) for name in sorted(cell.runners())]}


@router.get("/runners/{name}", response_model=m.RunnerInfo, tags=["runners"],
            summary="One runner", responses=problem_responses(401, 404, 422))
def get_runner(name: str, user: User, cell: CellDep) -> dict[str, Any]:
    """One runner: version, plane, params as JSON Schema, outputs and resources."""
    try:
        return runner_info(cell, name)
    except NotFoundError:   # the service's message names the cell's home: not for clients
        raise ProblemError(404, f"no runner named {name!r} (see GET /api/v1/runners)") \
            from None


@router.get("/capabilities", response_model=m.Capabilities, tags=["cell"],
            summary="What the cell offers", responses=problem_responses(401),
            response_model_exclude_unset=True)
def capabilities(user: User, cell: CellDep) -> dict[str, Any]:
    """CPU slots, memory and GPUs and where each figure came from; for a delegated
    backend also what it reports."""
    found = cell.capabilities()
    found.pop("home", None)     # a server path
    return found


@router.get("/scheduler", response_model=m.SchedulerStatus, tags=["cell"],
            summary="The scheduler's books", responses=problem_responses(401))
def scheduler(user: User, cell: CellDep) -> dict[str, Any]:
    """Capacity, used and free resources, leases, queue depth, cooldowns and the worker.
    Leases and the queue by owner show only the signed-in user's own entries, and no
    other owner's job id appears."""
    status = cell.scheduler_status()
    status["leases"] = [lease for lease in status["leases"] if lease["owner"] == user]
    by_owner = status["queue"]["by_owner"]
    status["queue"]["by_owner"] = {user: by_owner[user]} if user in by_owner else {}
    for cooldown in status["cooldowns"]:
        if cooldown["reason"]:
            cooldown["reason"] = _hide_others_jobs(cell, user, cooldown["reason"])
    return status


def _hide_others_jobs(cell: Cell, user: str, text: str) -> str:
    """``text`` with every job id that is not ``user``'s replaced by a placeholder."""

    def hide(match: re.Match[str]) -> str:
        try:
            cell.status(match.group(0), owner=user)
        except NotFoundError:
            return "<another owner's job>"
        return match.group(0)

    return JOB_ID_PATTERN.sub(hide, text)


@router.get("/me", response_model=m.Me, tags=["cell"], summary="Who you are",
            responses=problem_responses(401))
def me(user: User) -> dict[str, Any]:
    """The user the bearer token belongs to."""
    return {"user": user}


# -- uploads
@router.post("/uploads", status_code=201, response_model=m.UploadAnswer, tags=["uploads"],
             summary="Upload an input file", openapi_extra=UPLOAD_BODY,
             responses=problem_responses(400, 401, 408, 413))
async def upload(request: Request, user: User, cell: CellDep) -> dict[str, Any]:
    """Store the body by content (BLAKE3); a job step names it in ``files`` by digest.
    Only its uploader's jobs may use it."""
    limit = cell.settings.upload_max_mb * 1024 * 1024
    declared = _declared_length(request)
    if declared is not None and declared > limit:
        raise ProblemError(413, str(too_large(limit)))
    upload = cell.open_upload(owner=user)
    try:
        # The body is read on the event loop; only the disk writes go to threads, through
        # a limiter of their own: slow or stalled uploads never hold the threads every
        # other route needs.
        batch: list[bytes] = []
        size = 0
        stream = request.stream().__aiter__()
        while True:
            try:
                with anyio.fail_after(UPLOAD_IDLE_S):
                    chunk = await stream.__anext__()
            except StopAsyncIteration:
                break
            batch.append(chunk)
            size += len(chunk)
            if size >= UPLOAD_BATCH:
                await anyio.to_thread.run_sync(upload.write, b"".join(batch),
                                               limiter=_limiter(UPLOAD_THREADS))
                batch, size = [], 0
        if batch:
            await anyio.to_thread.run_sync(upload.write, b"".join(batch),
                                           limiter=_limiter(UPLOAD_THREADS))
        answer: dict[str, Any] = await anyio.to_thread.run_sync(upload.finish,
                                                                limiter=_limiter(UPLOAD_THREADS))
    except UploadTooLargeError as exc:
        raise ProblemError(413, str(exc)) from None
    except TimeoutError:
        raise ProblemError(408, f"the upload sent nothing for {UPLOAD_IDLE_S:g} s; nothing "
                                "was kept") from None
    except ClientDisconnect:
        raise ProblemError(400, "the client disconnected during the upload; nothing was "
                                "kept") from None
    finally:
        upload.abort()
    return answer


@router.post("/uploads/from-output", status_code=201, response_model=m.UploadAnswer,
             tags=["uploads"], summary="Make an output file of yours an upload",
             responses=problem_responses(400, 401, 404, 413, 422))
def upload_from_output(body: m.FromOutput, user: User, cell: CellDep) -> dict[str, Any]:
    """Copy one output file of your job into your uploads (by content), so that another
    job's step can name it in ``files``: a file goes from task to task without being
    downloaded by the client. The output's download link may have expired."""
    try:
        return cell.upload_output(body.job_id, body.step, body.name, owner=user)
    except UploadTooLargeError as exc:
        raise ProblemError(413, str(exc)) from None


# -- admin
@router.get("/admin/jobs", response_model=m.JobPage, tags=["admin"],
            summary="List every owner's jobs", responses=problem_responses(400, 401, 403, 422))
async def admin_list_jobs(admin: Admin, cell: CellOnLoop, label: Label = None,
                          state: State = None, tag: Tag = None,
                          owner: Annotated[str | None, Query(max_length=64, description=(
                              "Only jobs of this owner."))] = None,
                          limit: Limit = 100, offset: Offset = 0) -> Response:
    """Jobs of all owners, newest first, filtered by label, state, tag and owner."""
    return await _page_in_thread(cell, owner=owner, label=label, state=state, tag=tag,
                                 limit=limit, offset=offset)


@router.delete("/admin/jobs/{job_id}", response_model=m.CancelAnswer, tags=["admin"],
               summary="Cancel any job", responses=problem_responses(401, 403, 404, 422, 503))
def admin_cancel_job(job_id: JobId, admin: Admin, cell: CellDep) -> dict[str, Any]:
    """Cancel a job of any owner."""
    return cell.cancel(job_id, wait_s=CANCEL_WAIT_S)


@router.post("/admin/cancel", response_model=m.TagCancelAnswer, tags=["admin"],
             summary="Cancel jobs by tag", openapi_extra=TAG_CANCEL_BODY,
             responses=problem_responses(400, 401, 403, 413, 422, 503))
def admin_cancel_by_tag(admin: Admin, cell: CellDep,
                        body: Annotated[m.TagCancel, Depends(tag_cancel_body)]
                        ) -> dict[str, Any]:
    """Request the cancel of every queued or running job with a tag matching the glob;
    answers their ids (the worker stops them shortly after)."""
    job_ids = cell.query_jobs_by_tag(body.tag, states=["queued", "running"])
    for job_id in job_ids:
        with contextlib.suppress(NotFoundError):    # removed meanwhile
            cell.cancel(job_id, wait_s=0)
    return {"tag": body.tag, "job_ids": job_ids}
