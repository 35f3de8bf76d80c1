"""A backend that is not configured: a clear reason, never a crash or a lost step."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from integration_support import register_tool, run_worker, step_of

from jobcell.errors import ConfigError
from jobcell.executors.select import make_executor
from jobcell.home import open_home
from jobcell.service import Cell
from jobcell.settings import load_settings


def test_slurm_over_ssh_needs_a_staging_directory(tmp_path: Path) -> None:
    settings = load_settings(None, env={}, overrides={"slurm_login_host": "login.example"})
    with pytest.raises(ConfigError, match="slurm_tmp_io"):
        make_executor("slurm", open_home(tmp_path / "cell"), settings)


def test_a_step_for_an_unconfigured_external_backend_fails_with_the_reason(
        make_cell: Callable[..., Cell], tools: Path) -> None:
    cell = make_cell(executor_backend="external")
    register_tool(cell, tools, "w", ["write", "{output_dir}", "x.txt", "hi"])
    job_id = cell.submit({"label": "config", "steps": [{"id": "w", "runner": "w"}]}).job_id
    run_worker(cell, timeout_s=30)
    status = cell.status(job_id)
    assert status["state"] == "failed"
    assert "external_submit_cmd" in step_of(status, "w")["error"]
    with pytest.raises(ConfigError, match="external_submit_cmd"):
        cell.capabilities()
