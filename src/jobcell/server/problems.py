"""Errors as RFC 9457 ``application/problem+json`` (OGC exceptions share the shape).

Every error the server answers goes through here, so a client always gets a JSON body
with ``type``, ``title``, ``status`` and a ``detail`` saying what was wrong, and bad
input of any kind is a 4xx, never a 500.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobcell.errors import (
    ConfigError,
    DuplicateError,
    JobcellError,
    NotFoundError,
    QuotaError,
    RunnerDefinitionError,
    SpecError,
    WorkerError,
)

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("jobcell.server")

# How each kind of jobcell error answers over HTTP.
_STATUS_OF: tuple[tuple[type[JobcellError], int], ...] = (
    (NotFoundError, 404),
    (DuplicateError, 409),
    (QuotaError, 429),
    (SpecError, 400),
    (RunnerDefinitionError, 400),
    (WorkerError, 503),
    (ConfigError, 503),
)


class Problem(BaseModel):
    """An error: what kind (``type``), a short ``title``, the HTTP ``status`` and a
    ``detail`` sentence naming what was wrong and where."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None


class ProblemError(Exception):
    """Raise from a route to answer with a problem document."""

    def __init__(self, status: int, detail: str, *, type_: str = "about:blank",
                 title: str | None = None, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.type = type_
        self.title = title or HTTPStatus(status).phrase
        self.headers = headers or {}
        self.extra = extra


def problem_response(status: int, detail: str, *, type_: str = "about:blank",
                     title: str | None = None, instance: str | None = None,
                     headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body = {"type": type_, "title": title or HTTPStatus(status).phrase, "status": status,
            "detail": detail, **({"instance": instance} if instance else {}), **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the problem statuses a route may answer."""
    schema = {"$ref": "#/components/schemas/Problem"}
    return {status: {"model": Problem, "description": HTTPStatus(status).phrase,
                     "content": {PROBLEM_JSON: {"schema": schema}}}
            for status in statuses}


def status_of(exc: JobcellError) -> int:
    for kind, status in _STATUS_OF:
        if isinstance(exc, kind):
            return status
    return 400


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def install_problem_handlers(app: FastAPI) -> None:
    """Answer every error as problem+json."""

    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        return problem_response(exc.status, exc.detail, type_=exc.type, title=exc.title,
                                instance=request.url.path, headers=exc.headers, **exc.extra)

    @app.exception_handler(JobcellError)
    async def _jobcell(request: Request, exc: JobcellError) -> JSONResponse:
        return problem_response(status_of(exc), str(exc), instance=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(422, _validation_detail(exc), instance=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.url.path!r}"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path!r}"
        return problem_response(exc.status_code, detail, instance=request.url.path,
                                headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return problem_response(500, "an unexpected server error; it was logged",
                                instance=request.url.path)
