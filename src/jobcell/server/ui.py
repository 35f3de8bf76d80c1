"""The web dashboard at ``/ui``: jobs table, job page, scheduler page, token login.

Server-rendered with Jinja2 (autoescape on: labels, tags and log lines are text, never
markup); ``static/dashboard.js`` only refreshes live regions by fetching HTML fragments
(``/ui/jobs/rows``, ``/ui/jobs/{id}/live``, ``/ui/scheduler/live``). Every page works
without JavaScript.

Login: the user pastes an API token (``jobcell users add NAME``); it is checked with
``Cell.authenticate`` and kept in an HttpOnly, SameSite=Strict cookie scoped to ``/ui``
(Secure over https). Each request checks it again, so a revoked token stops working at
once. Errors on ``/ui`` routes answer as HTML pages, not problem+json.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any

import jinja2
from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from jobcell import __version__
from jobcell.errors import JobcellError
from jobcell.server import ui_views as views
from jobcell.server.deps import get_cell, output_links
from jobcell.server.problems import ProblemError, status_of
from jobcell.service import Cell

log = logging.getLogger("jobcell.server.ui")

TEMPLATES_DIR = Path(__file__).parent / "templates"
COOKIE = "jobcell_ui_token"
PAGE_SIZE = 25
LOG_LINES = 50
LOG_ALL_STEPS_MAX = 20      # above this many steps, log tails are shown for a chosen step
EVENTS_SHOWN = 200
REFRESH_MS = 3000

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}

_env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=True,
                          undefined=jinja2.StrictUndefined, trim_blocks=True,
                          lstrip_blocks=True)
_env.filters.update(when=views.when, size=views.size_text, memory=views.memory_text,
                    short=views.short)
_env.globals.update(duration=views.duration, percent=views.percent,
                    event_details=views.event_details,
                    query=views.query_string, version=__version__, refresh_ms=REFRESH_MS)
templates = Jinja2Templates(env=_env)


class LoginRequired(Exception):
    """No valid session cookie: the page answers with a redirect to the login form."""


def _base(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def render(request: Request, name: str, context: dict[str, Any],
           status_code: int = 200) -> HTMLResponse:
    user = getattr(request.state, "ui_user", None)
    full = {"user": user, "base": _base(request), "nav": None, **context}
    return templates.TemplateResponse(request, name, full, status_code=status_code,
                                       headers=SECURITY_HEADERS)


def error_page(request: Request, status: int, detail: str) -> HTMLResponse:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    return render(request, "error.html", {"status": status, "title": title,
                                          "detail": detail}, status_code=status)


def login_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    base = _base(request)
    where = views.safe_next(target, base)
    url = f"{base}/ui/login" + views.query_string(next=where if where != base + "/ui" else "")
    response = RedirectResponse(url, status_code=303, headers={"Cache-Control": "no-store"})
    if COOKIE in request.cookies:
        response.delete_cookie(COOKIE, path=f"{base}/ui")
    return response


class UiRoute(APIRoute):
    """A route whose errors answer as HTML pages (and a missing login as a redirect)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except LoginRequired:
                return login_redirect(request)
            except ProblemError as exc:
                return error_page(request, exc.status, exc.detail)
            except JobcellError as exc:
                return error_page(request, status_of(exc), str(exc))
            except RequestValidationError as exc:
                return error_page(request, 400, _validation_detail(exc))
            except StarletteHTTPException as exc:
                detail = exc.detail if isinstance(exc.detail, str) else ""
                return error_page(request, exc.status_code, detail)
            except Exception:
                log.exception("unexpected error on %s %s", request.method, request.url.path)
                return error_page(request, 500, "An unexpected server error; it was logged.")

        return route


class FallbackRoute(UiRoute):
    """Answers unknown ``/ui/...`` paths with the HTML 404 page; leaves static files be."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path, root = str(scope.get("path", "")), str(scope.get("root_path", ""))
        if root and path.startswith(root):
            path = path[len(root):]
        if path.startswith("/ui/static/"):
            return Match.NONE, {}
        return super().matches(scope)


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("query", "body"))
        parts.append(f"{where or 'request'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request is not valid"


router = APIRouter(prefix="/ui", route_class=UiRoute, include_in_schema=False)


def ui_user(request: Request) -> str:
    """The user of the session cookie; without a valid one, :class:`LoginRequired`."""
    token = request.cookies.get(COOKIE)
    if not token or len(token) > 1000:
        raise LoginRequired()
    user = get_cell(request).authenticate(token)
    if user is None:
        raise LoginRequired()
    request.state.ui_user = user
    return user


UiUser = Annotated[str, Depends(ui_user)]
CellDep = Annotated[Cell, Depends(get_cell)]


# -- login ---------------------------------------------------------------------------------

@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str | None = None) -> HTMLResponse:
    return render(request, "login.html", {"next": views.safe_next(next, _base(request)),
                                          "message": None})


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, cell: CellDep, token: Annotated[str, Form()] = "",
          next: Annotated[str, Form()] = "") -> Response:
    base = _base(request)
    target = views.safe_next(next, base)
    token = token.strip()
    user = cell.authenticate(token) if token and len(token) <= 1000 else None
    if user is None:
        message = ("Enter your API token." if not token else
                   "That token is unknown or has been revoked. Ask the cell's admin for a "
                   "token (jobcell users add NAME).")
        return render(request, "login.html", {"next": target, "message": message},
                      status_code=401)
    response = RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})
    response.set_cookie(COOKIE, token, path=f"{base}/ui", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


@router.post("/logout")
def logout(request: Request) -> RedirectResponse:
    base = _base(request)
    response = RedirectResponse(f"{base}/ui/login", status_code=303,
                                headers={"Cache-Control": "no-store"})
    response.delete_cookie(COOKIE, path=f"{base}/ui", httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")
    return response


# -- jobs table ----------------------------------------------------------------------------

Filter = Annotated[str | None, Query(max_length=500)]
PageNumber = Annotated[int, Query(ge=1, le=1_000_000)]


def _jobs(cell: Cell, user: str, label: str | None, state: str | None, tag: str | None,
          page: int) -> dict[str, Any]:
    label, state, tag = views.clean(label), views.clean(state), views.clean(tag)
    filters = {"label": label, "state": state, "tag": tag}
    if state is not None and state not in views.JOB_STATES:
        return {"filters": filters, "jobs": [], "page": views.Page(page, PAGE_SIZE, False),
                "message": f"Unknown state {state!r}: choose one of "
                           f"{', '.join(views.JOB_STATES)}."}
    offset = (page - 1) * PAGE_SIZE
    jobs = cell.list(label=label, state=state, tag=tag, owner=user, limit=PAGE_SIZE + 1,
                     offset=offset)
    return {"filters": filters, "jobs": jobs[:PAGE_SIZE], "message": None,
            "page": views.Page(page, PAGE_SIZE, len(jobs) > PAGE_SIZE)}


@router.get("", response_class=HTMLResponse)
def jobs_page(request: Request, user: UiUser, cell: CellDep, label: Filter = None,
              state: Filter = None, tag: Filter = None, page: PageNumber = 1) -> HTMLResponse:
    context = _jobs(cell, user, label, state, tag, page)
    return render(request, "jobs.html", {**context, "nav": "jobs", "states": views.JOB_STATES},
                  status_code=400 if context["message"] else 200)


@router.get("/jobs/rows", response_class=HTMLResponse)
def jobs_rows(request: Request, user: UiUser, cell: CellDep, label: Filter = None,
              state: Filter = None, tag: Filter = None, page: PageNumber = 1) -> HTMLResponse:
    """The jobs table's body alone: what the live refresh swaps in."""
    context = _jobs(cell, user, label, state, tag, page)
    return render(request, "_job_rows.html", context)


# -- job page ------------------------------------------------------------------------------

StepName = Annotated[str | None, Query(max_length=200)]
Lines = Annotated[int, Query(ge=1, le=2000)]


def _job(request: Request, cell: Cell, user: str, job_id: str, step: str | None,
         lines: int) -> dict[str, Any]:
    status = cell.status(job_id, owner=user)
    events = cell.events(job_id, owner=user)
    outputs = output_links(request, job_id, cell.outputs(job_id, owner=user))
    steps = status["steps"]
    step_ids = {s["id"] for s in steps}
    step = views.clean(step)
    chosen = step if step in step_ids else None
    if chosen is not None or len(steps) <= LOG_ALL_STEPS_MAX:
        logs = cell.logs(job_id, step=chosen, last_n=lines, owner=user)["steps"]
    else:
        logs = []
    states = {s["id"]: s["state"] for s in steps}
    for entry in logs:
        entry["state"] = states.get(entry["step"], "")
    layout = views.dag_layout(steps) if 0 < len(steps) <= views.MAX_GRAPH_STEPS else None
    return {"job": status, "steps": steps, "layout": layout, "events": events[-EVENTS_SHOWN:],
            "events_total": len(events), "logs": logs, "outputs": outputs,
            "chosen_step": chosen, "lines": lines, "many_steps": len(steps) > LOG_ALL_STEPS_MAX,
            "active": status["state"] in views.ACTIVE_JOB_STATES,
            "live_query": views.query_string(step=chosen, lines=lines if lines != LOG_LINES
                                             else None)}


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, user: UiUser, cell: CellDep, job_id: str,
             step: StepName = None, lines: Lines = LOG_LINES) -> HTMLResponse:
    context = _job(request, cell, user, job_id, step, lines)
    return render(request, "job.html", {**context, "nav": "jobs"})


@router.get("/jobs/{job_id}/live", response_class=HTMLResponse)
def job_live(request: Request, user: UiUser, cell: CellDep, job_id: str,
             step: StepName = None, lines: Lines = LOG_LINES) -> HTMLResponse:
    """The job page's live part alone: what the live refresh swaps in."""
    context = _job(request, cell, user, job_id, step, lines)
    return render(request, "_job_body.html", context)


# -- scheduler page ------------------------------------------------------------------------

def _scheduler(cell: Cell, user: str) -> dict[str, Any]:
    status = cell.scheduler_status()
    cap, used = status["capacity"], status["used"]
    leases = status["leases"]
    queue = status["queue"]
    return {
        "bars": [
            {"name": "CPU slots", "used": used["cpu_slots"], "total": cap["cpu_slots"],
             "text": f"{used['cpu_slots']} of {cap['cpu_slots']} in use"},
            {"name": "Memory", "used": used["memory_mb"], "total": cap["memory_mb"],
             "text": f"{views.memory_text(used['memory_mb'])} of "
                     f"{views.memory_text(cap['memory_mb'])} in use"},
            {"name": "GPUs", "used": len(used["gpus"]), "total": len(cap["gpus"]),
             "text": (f"{len(used['gpus'])} of {len(cap['gpus'])} in use" if cap["gpus"]
                      else "none on this cell")}],
        "free": status["free"],
        "my_leases": [lease for lease in leases if lease["owner"] == user],
        "other_leases": sum(1 for lease in leases if lease["owner"] != user),
        "by_runner": sorted(queue["by_runner"].items()),
        "queue_depth": queue["depth"], "waiting_cache": queue["waiting_cache"],
        "my_queued": queue["by_owner"].get(user, 0),
        "cooldowns": status["cooldowns"], "worker": status["worker"]}


@router.get("/scheduler", response_class=HTMLResponse)
def scheduler_page(request: Request, user: UiUser, cell: CellDep) -> HTMLResponse:
    return render(request, "scheduler.html", {**_scheduler(cell, user), "nav": "scheduler"})


@router.get("/scheduler/live", response_class=HTMLResponse)
def scheduler_live(request: Request, user: UiUser, cell: CellDep) -> HTMLResponse:
    return render(request, "_scheduler_body.html", _scheduler(cell, user))


# -- everything else under /ui -------------------------------------------------------------

def not_found(request: Request, user: UiUser, rest: str) -> Response:
    if rest == "":
        return RedirectResponse(f"{_base(request)}/ui", status_code=308)
    return error_page(request, 404, f"There is no dashboard page at {request.url.path}.")


router.add_api_route("/{rest:path}", not_found, methods=["GET"], response_class=HTMLResponse,
                     route_class_override=FallbackRoute, include_in_schema=False)
