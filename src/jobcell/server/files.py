"""Output downloads through signed, expiring URLs (``/api/v1/files/...``).

The URL is the credential: the outputs and result endpoints hand out URLs signed with
HMAC over the path and the expiry time, so a browser or another tool can fetch the file
without the bearer token. Only a registered output of that job and step is served, from
inside its attempt's output directory, never through a symlink. Range requests work
(single and multiple ranges, ``If-Range``).
"""

from __future__ import annotations

import mimetypes
import os
import re
import stat
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from starlette.types import Receive, Scope, Send

from jobcell.errors import NotFoundError
from jobcell.server.deps import FILES_PREFIX, CellDep, file_path, server_state
from jobcell.server.problems import ProblemError, problem_responses
from jobcell.service import Cell

router = APIRouter()

MAX_RANGES = 100
_RANGE_SPEC = re.compile(r"\s*([0-9]{0,30})\s*-\s*([0-9]{0,30})\s*")
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_ANY_FILE = {"application/octet-stream": _BINARY, "*/*": _BINARY}
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The file.", "content": _ANY_FILE},
    206: {"description": "The requested byte range(s) of the file.", "content": _ANY_FILE},
    **problem_responses(403, 404, 416, 422),
}
DESCRIPTION = (
    "Download one output file. **No bearer token is needed: the signed URL is the "
    "credential.** Take the URL from the `href` of `GET /api/v1/jobs/{id}/outputs` or "
    "`/result`; it stops working at `expires` (ask again for a fresh one). A tampered, "
    "expired or unsigned URL answers 403. Supports `Range` (206, `Content-Range`; 416 "
    "when no range is satisfiable) and `If-Range`.")

Expires = Annotated[str | None, Query(max_length=20, description="UNIX time the URL "
                                                                "expires (signed).")]
Signature = Annotated[str | None, Query(max_length=128, description="HMAC-SHA256 of the "
                                                                   "path and expiry.")]


def plan_ranges(header: str | None, size: int) -> list[tuple[int, int]] | str | None:
    """What a ``Range`` header asks of a file of ``size`` bytes (RFC 9110 section 14).

    ``None``: serve the whole file (no header, another unit, or one that is malformed,
    which a server may ignore); ``"unsatisfiable"``: answer 416; else the satisfiable
    ranges as inclusive ``(first, last)`` byte positions.
    """
    if header is None:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    parts = [p for p in spec.split(",") if p.strip()]
    if not parts or len(parts) > MAX_RANGES:
        return None
    ranges: list[tuple[int, int]] = []
    for part in parts:
        match = _RANGE_SPEC.fullmatch(part)
        if match is None or not any(match.groups()):
            return None
        first, last = match.groups()
        if first:
            start = int(first)
            end = int(last) if last else size - 1
            if last and end < start:
                return None         # an invalid range-spec makes the header invalid
            if start < size:
                ranges.append((start, min(end, size - 1)))
        elif int(last) > 0 and size > 0:      # a suffix: the last N bytes
            ranges.append((max(size - int(last), 0), size - 1))
    return ranges or "unsatisfiable"


class Download(FileResponse):
    """A file response that answers the range plan decided here (Starlette serves the
    ranges; a header we chose to ignore never reaches it)."""

    def __init__(self, path: Path, ranges: list[tuple[int, int]] | None, **kwargs: Any
                 ) -> None:
        super().__init__(path, **kwargs)
        self._range = (None if ranges is None
                       else "bytes=" + ",".join(f"{a}-{b}" for a, b in ranges))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"range"]
        if self._range is not None:
            headers.append((b"range", self._range.encode("ascii")))
        await super().__call__({**scope, "headers": headers}, receive, send)


def content_disposition(name: str) -> str:
    """``attachment`` with an ASCII-safe ``filename`` and the exact UTF-8 ``filename*``."""
    base = name.rsplit("/", 1)[-1]
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".") or "download"
    return f"attachment; filename=\"{safe}\"; filename*=UTF-8''{quote(base, safe='')}"


def _output_file(cell: Cell, job_id: str, step: str, name: str) -> tuple[Path, os.stat_result]:
    """The registered output's file, checked to be a regular file inside its attempt's
    output directory with no symlink on the way."""
    missing = ProblemError(404, f"job {job_id!r} has no output {name!r} of step {step!r}")
    try:
        row = next((o for o in cell.outputs(job_id)
                    if o["step"] == step and o["name"] == name), None)
        attempt = next((s["attempt"] for s in cell.status(job_id)["steps"]
                        if s["id"] == step), None)
    except NotFoundError:
        raise ProblemError(404, f"job {job_id!r} no longer exists") from None
    if row is None or attempt is None:
        raise missing
    output_dir = Path(os.path.realpath(cell.home.attempt_dir(job_id, step, attempt) / "output"))
    expected = output_dir / name
    if (os.path.realpath(row["path"]) != str(expected)
            or os.path.realpath(expected) != str(expected)):
        raise ProblemError(403, f"output {name!r} of step {step!r} is not a file inside its "
                                "step's output directory; it is not served")
    try:
        found = os.lstat(expected)
    except OSError:
        raise missing from None
    if not stat.S_ISREG(found.st_mode):
        raise ProblemError(403, f"output {name!r} of step {step!r} is not a regular file; "
                                "it is not served")
    return expected, found


def _download(request: Request, cell: Cell, job_id: str, step: str, name: str,
              expires: str | None, sig: str | None) -> Download:
    refused = server_state(request).signer.check(file_path(job_id, step, name), expires, sig)
    if refused is not None:
        raise ProblemError(403, refused)
    path, found = _output_file(cell, job_id, step, name)
    plan = plan_ranges(request.headers.get("range"), found.st_size)
    if plan == "unsatisfiable":
        raise ProblemError(416, f"no requested byte range lies within the file's "
                                f"{found.st_size} bytes",
                           headers={"Content-Range": f"bytes */{found.st_size}"})
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return Download(path, plan if isinstance(plan, list) else None, stat_result=found,
                    media_type=media_type, headers={
                        "Content-Disposition": content_disposition(name),
                        "X-Content-Type-Options": "nosniff",
                        "Content-Security-Policy": "default-src 'none'; sandbox",
                        "Cache-Control": "private, no-cache"})


FILE_ROUTE = FILES_PREFIX + "/{job_id}/{step}/{name:path}"


@router.get(FILE_ROUTE, response_class=FileResponse, response_model=None, tags=["files"],
            summary="Download an output file (signed URL)", description=DESCRIPTION,
            responses=RESPONSES)
def download(job_id: str, step: str, name: str, request: Request, cell: CellDep,
             expires: Expires = None, sig: Signature = None) -> Download:
    return _download(request, cell, job_id, step, name, expires, sig)


@router.head(FILE_ROUTE, response_class=FileResponse, response_model=None, tags=["files"],
             summary="An output file's headers (signed URL)", description=DESCRIPTION,
             responses=RESPONSES)
def download_head(job_id: str, step: str, name: str, request: Request, cell: CellDep,
                  expires: Expires = None, sig: Signature = None) -> Download:
    return _download(request, cell, job_id, step, name, expires, sig)
