"""Integration fixtures: real cells on disk, real workers, real child processes.

Cell options are written to ``<home>/jobcell.toml`` so that an in-process
worker and a daemon worker (which reads only the file) see the same values.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from integration_support import TOOLS, cleanup_cell, write_settings

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


