"""The FastAPI app of ``jobcell serve``: REST API, OGC API - Processes, dashboard."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from jobcell import __version__
from jobcell.home import CellHome
from jobcell.server.deps import ServerState
from jobcell.server.problems import Problem, install_problem_handlers
from jobcell.server.signing import UrlSigner, load_signing_key
from jobcell.service import Cell

STATIC_DIR = Path(__file__).parent / "static"
# How ``jobcell serve --workers N`` tells each server process its cell (see
# create_app_from_env): the home, and whether a submit may start the cell's worker.
SERVE_HOME_ENV = "JOBCELL_SERVE_HOME"
SERVE_AUTO_WORKER_ENV = "JOBCELL_SERVE_AUTO_WORKER"
SERVE_PARENT_ENV = "JOBCELL_SERVE_PARENT"
PR_SET_PDEATHSIG = 1          # prctl(2)


def create_app(home: str | os.PathLike[str] | CellHome | None = None, *,
               cell: Cell | None = None, settings: dict[str, Any] | None = None,
               start_worker: bool = True, callbacks: bool = True) -> FastAPI:
    """The server app for one cell.

    ``start_worker``: start (or join) the cell's embedded worker when the app starts.
    ``callbacks``: run the OGC subscriber-callback sender while the app runs.
    """
    from jobcell.server import api, files, ogc, ui
    from jobcell.server import callbacks as callback_sender

    cell = cell or Cell(home, settings=settings)
    signer = UrlSigner(load_signing_key(cell.home), cell.settings.download_url_ttl_s)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if start_worker:
            await asyncio.to_thread(cell.ensure_worker)
        stop = asyncio.Event()
        sender = (asyncio.create_task(callback_sender.run(cell, stop)) if callbacks
                  else None)
        try:
            yield
        finally:
            stop.set()
            if sender is not None:
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(sender, timeout=5)

    app = FastAPI(title="jobcell", version=__version__, lifespan=lifespan,
                  description="A durable job runtime for scientific computing: REST API "
                              "(/api/v1), OGC API - Processes (/, /processes, /jobs) and a "
                              "web dashboard (/ui).")
    app.state.jobcell = ServerState(cell=cell, signer=signer)
    install_problem_handlers(app)
    app.include_router(api.router)
    app.include_router(files.router)
    app.include_router(ogc.router)
    app.include_router(ui.router)
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="ui-static")
    _register_problem_schema(app)
    return app


def create_app_from_env() -> FastAPI:
    """The app of one ``jobcell serve --workers N`` process (a uvicorn app factory).

    The cell's home is ``$JOBCELL_SERVE_HOME``; ``$JOBCELL_SERVE_AUTO_WORKER`` (``0`` or
    ``1``) says whether a submit may start the cell's worker when none runs. The process
    never starts the worker when it starts: ``serve`` did that once, before it started the
    processes. One process at a time sends callbacks (a lock in the cell), so a job's
    callbacks go out in order. The process ends when ``serve`` dies, even by SIGKILL.
    """
    _die_with_parent(os.environ.get(SERVE_PARENT_ENV))
    home = os.environ.get(SERVE_HOME_ENV)
    if not home:
        raise RuntimeError(f"{SERVE_HOME_ENV} is not set (jobcell serve sets it for its "
                           "server processes)")
    auto_worker = os.environ.get(SERVE_AUTO_WORKER_ENV, "1") != "0"
    return create_app(cell=Cell(home, auto_worker=auto_worker), start_worker=False)


def _die_with_parent(parent: str | None) -> None:
    """Linux: get SIGTERM when the ``serve`` process that started this one dies (a
    SIGKILL of it must not leave server processes holding the port)."""
    if not parent or not parent.isdigit():
        return
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != int(parent):     # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _register_problem_schema(app: FastAPI) -> None:
    """Make ``#/components/schemas/Problem`` exist even if no route lists it by model."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = original()
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas.setdefault("Problem", Problem.model_json_schema())
            _admin_needs_both(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _admin_needs_both(schema: dict[str, Any]) -> None:
    """Admin routes need the bearer token *and* the admin key: one security requirement
    with both schemes (FastAPI lists them as alternatives)."""
    for path, operations in schema.get("paths", {}).items():
        if not path.startswith("/api/v1/admin/"):
            continue
        for operation in operations.values():
            if isinstance(operation, dict) and operation.get("security"):
                merged: dict[str, list[str]] = {}
                for requirement in operation["security"]:
                    merged.update(requirement)
                operation["security"] = [merged]
