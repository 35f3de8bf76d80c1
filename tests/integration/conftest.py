"""Integration fixtures: real cells on disk, real workers, real child processes.

Cell options are written to ``<home>/jobcell.toml`` so that an in-process
worker and a daemon worker (which reads only the file) see the same values.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from integration_support import TOOLS, cleanup_cell, register_tool, run_worker, write_settings

from jobcell.service import Cell


@pytest.fixture
def tools(tmp_path: Path) -> Path:
    """The path of the runner program ``tools.py``."""
    path = tmp_path / "tools.py"
    path.write_text(textwrap.dedent(TOOLS))
    return path


@pytest.fixture
def make_cell(tmp_path: Path) -> Iterator[Callable[..., Cell]]:
    """Open a cell with the test settings (plus overrides); stops whatever it started."""
    opened: list[Cell] = []

    def factory(name: str = "cell", **settings: Any) -> Cell:
        home = tmp_path / name
        write_settings(home, **settings)
        cell = Cell(home, auto_worker=False)
        opened.append(cell)
        return cell

    yield factory
    for cell in opened:
        cleanup_cell(cell)


@pytest.fixture
def cell(make_cell: Callable[..., Cell]) -> Cell:
    """A cell with the test settings; the test drives its worker."""
    return make_cell()




@dataclass
class Api:
    """An in-process server over a real cell: the app, a client, users and a worker."""

    cell: Cell
    app: Any
    client: Any    # fastapi.testclient.TestClient (an httpx client over the ASGI app)
    tools: Path

    def user(self, name: str) -> dict[str, str]:
        """Headers with the bearer token of a new user ``name``."""
        token = self.cell.add_user(name)["token"]
        return {"Authorization": f"Bearer {token}"}

    def register(self, name: str, args: list[str], **fields: Any) -> None:
        """Register a runner that runs ``python tools.py ARGS``."""
        register_tool(self.cell, self.tools, name, args, **fields)

    def run_worker(self, timeout_s: float = 60.0) -> None:
        """Run an in-process worker until no job is active."""
        run_worker(self.cell, timeout_s)


@pytest.fixture
def make_api(make_cell: Callable[..., Cell], tools: Path) -> Iterator[Callable[..., Api]]:
    """Build an in-process server for a fresh cell (settings as keyword arguments).

    The worker is not started by the app: tests run it with ``api.run_worker()``.
    ``callbacks=True`` runs the OGC callback sender while the client is open.
    """
    from fastapi.testclient import TestClient

    from jobcell.server import create_app

    clients: list[Any] = []

    def factory(name: str = "cell", *, callbacks: bool = False, **settings: Any) -> Api:
        cell = make_cell(name, **settings)
        app = create_app(cell=cell, start_worker=False, callbacks=callbacks)
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return Api(cell=cell, app=app, client=client, tools=tools)

    yield factory
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:
    """An in-process server over a fresh cell with the test settings."""
    return make_api()
