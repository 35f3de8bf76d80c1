"""Shared fixtures: every test is isolated from the user's jobcell environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("JOBCELL_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("JOBCELL_HOME", str(tmp_path / "default-home"))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A path for a cell home (created on first use by the code under test)."""
    return tmp_path / "cell"
