"""The cell home: where it is, its layout, and clear errors when it cannot be used."""

from __future__ import annotations

from pathlib import Path

import platformdirs
import pytest

from jobcell.errors import ConfigError
from jobcell.home import SUBDIRS, CellHome, open_home, resolve_home


def test_explicit_home_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.setenv("JOBCELL_HOME", str(tmp_path / "from-env"))
    assert resolve_home(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_home(None) == tmp_path / "from-env"


def test_without_either_the_user_data_dir_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOBCELL_HOME")
    expected = Path(platformdirs.user_data_dir("jobcell", appauthor=False)).absolute()
    assert resolve_home() == expected


def test_relative_and_user_paths_become_absolute(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_home("cell") == tmp_path / "cell"
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert resolve_home("~/cell") == tmp_path / "user" / "cell"


def test_open_home_creates_the_layout(home: Path) -> None:
    cell = open_home(home)
    assert cell.root == home
    for name in SUBDIRS:
        assert (home / name).is_dir()
    assert {"artifacts", "runners", "staging", "publish", "locks"} == set(SUBDIRS)


def test_open_home_is_idempotent_and_keeps_what_is_there(home: Path) -> None:
    open_home(home)
    (home / "runners" / "r.yaml").write_text("name: r\n")
    (home / "jobcell.toml").write_text("cpu_slots = 1\n")
    again = open_home(home)
    assert again == CellHome(home)
    assert (home / "runners" / "r.yaml").read_text() == "name: r\n"
    assert (home / "jobcell.toml").read_text() == "cpu_slots = 1\n"


def test_home_under_a_regular_file_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    target = blocker / "cell"
    with pytest.raises(ConfigError, match=f"cannot create the cell home {target}"):
        open_home(target)


def test_home_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "cell"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot create the cell home"):
        open_home(blocker)


def test_a_subdirectory_blocked_by_a_file_is_a_clear_error(home: Path) -> None:
    home.mkdir()
    (home / "locks").write_text("")
    with pytest.raises(ConfigError, match="cannot create the cell home"):
        open_home(home)


def test_paths_inside_the_home(tmp_path: Path) -> None:
    cell = CellHome(tmp_path)
    assert cell.db_path == tmp_path / "state.db"
    assert cell.config_file == tmp_path / "jobcell.toml"
    assert cell.wrapper_script == tmp_path / "wrapper.sh"
    assert cell.attempt_dir("j1", "count", 2) == tmp_path / "artifacts" / "j1" / "count" / (
        "attempt-2")
    assert cell.step_dir("j1", "count").parent == cell.job_dir("j1")
