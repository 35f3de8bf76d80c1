"""What routes share: the cell, the signed-in user, the admin check, output links."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from jobcell.server.problems import ProblemError
from jobcell.server.signing import UrlSigner
from jobcell.service import Cell

FILES_PREFIX = "/api/v1/files"
ADMIN_HEADER = "X-Admin-Key"

_bearer = HTTPBearer(auto_error=False, description="A token from `jobcell users add NAME`.")
_admin_header = APIKeyHeader(name=ADMIN_HEADER, auto_error=False,
                             description="The cell's admin_key (JOBCELL_ADMIN_KEY).")


@dataclass(frozen=True)
class ServerState:
    """What the app holds: the cell and the URL signer."""

    cell: Cell
    signer: UrlSigner


def server_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.jobcell
    return state


def get_cell(request: Request) -> Cell:
    return server_state(request).cell


def unauthorized(detail: str) -> ProblemError:
    return ProblemError(401, detail, headers={"WWW-Authenticate": "Bearer"})


def current_user(request: Request,
                 credentials: Annotated[HTTPAuthorizationCredentials | None,
                                        Depends(_bearer)]) -> str:
    """The user named by the request's bearer token, else 401."""
    if credentials is None:
        raise unauthorized("this route needs 'Authorization: Bearer <token>' (a token from "
                           "'jobcell users add NAME')")
    user = get_cell(request).authenticate(credentials.credentials)
    if user is None:
        raise unauthorized("the bearer token is unknown or revoked")
    return user


def admin_user(request: Request, user: Annotated[str, Depends(current_user)],
               key: Annotated[str | None, Depends(_admin_header)]) -> str:
    """A signed-in user who also gives the cell's admin key (compared in constant time).

    Without a configured ``admin_key`` the admin routes are disabled.
    """
    expected = get_cell(request).settings.admin_key
    if not expected:
        raise ProblemError(403, "admin routes are disabled: this cell has no admin_key "
                                "(set the option or JOBCELL_ADMIN_KEY)")
    if key is None:
        raise ProblemError(403, f"admin routes need the admin key in the {ADMIN_HEADER} "
                                "header")
    if not hmac.compare_digest(key.encode("utf-8", "surrogatepass"),
                               expected.encode("utf-8", "surrogatepass")):
        raise ProblemError(403, "the admin key is wrong")
    return user


User = Annotated[str, Depends(current_user)]
Admin = Annotated[str, Depends(admin_user)]
CellDep = Annotated[Cell, Depends(get_cell)]


def file_path(job_id: str, step: str, name: str) -> str:
    """The URL path of one output file (before signing)."""
    return f"{FILES_PREFIX}/{job_id}/{step}/{name}"


def output_links(request: Request, job_id: str,
                 outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Outputs as clients see them: no server path, a fresh signed URL for each.

    ``href`` is absolute (from the request's base URL, so a reverse proxy that sets the
    forwarded headers gets its own host); ``expires_at`` is a UNIX time.
    """
    from jobcell.service import iso

    signer = server_state(request).signer
    base = str(request.base_url).rstrip("/")
    entries = []
    for out in outputs:
        url, expires = signer.sign(file_path(job_id, out["step"], out["name"]))
        entries.append({"step": out["step"], "name": out["name"], "size": out["size"],
                        "blake3": out["blake3"], "href": base + url,
                        "expires_at": iso(expires)})
    return entries
