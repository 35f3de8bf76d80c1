"""Cell options: defaults < jobcell.toml < JOBCELL_<NAME> < overrides, with sources."""

from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path
from typing import Any

import pytest

from jobcell.errors import ConfigError
from jobcell.settings import OPTIONS, Settings, load_settings


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "jobcell.toml"
    path.write_text(text)
    return path


def config_error(*args: Any, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(*args, **kwargs)
    return str(info.value)


def test_defaults_from_the_issue() -> None:
    settings = load_settings(None, env={})
    assert settings.executor_backend == "embedded"
    assert settings.cpu_slots == "auto"
    assert settings.node_memory_mb == "auto"
    assert settings.memory_reserve_mb == 2048
    assert settings.max_jobs_global == 1_000_000
    assert settings.max_jobs_per_user is None
    assert settings.runner_registry_paths == []
    assert settings.runner_registry_autosync is True
    assert settings.admin_key is None
    assert set(settings.sources.values()) == {"default"}
    assert set(settings.values) == set(OPTIONS)


def test_a_missing_config_file_means_defaults(tmp_path: Path) -> None:
    settings = load_settings(tmp_path / "absent.toml", env={})
    assert settings.values == load_settings(None, env={}).values


def test_each_layer_overrides_the_one_before_and_is_recorded(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "cpu_slots = 3\nmemory_reserve_mb = 100\n"
                                "max_jobs_global = 50\npoll_interval_s = 0.5\n")
    env = {"JOBCELL_MEMORY_RESERVE_MB": "200", "JOBCELL_MAX_JOBS_GLOBAL": "60"}
    settings = load_settings(path, env=env, overrides={"max_jobs_global": 70})
    assert settings.cpu_slots == 3
    assert settings.sources["cpu_slots"] == f"file {path}"
    assert settings.memory_reserve_mb == 200
    assert settings.sources["memory_reserve_mb"] == "env JOBCELL_MEMORY_RESERVE_MB"
    assert settings.max_jobs_global == 70
    assert settings.sources["max_jobs_global"] == "override"
    assert settings.poll_interval_s == 0.5
    assert settings.sources["kill_grace_s"] == "default"


def test_a_jobcell_table_is_accepted(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[jobcell]\ncpu_slots = 2\n")
    assert load_settings(path, env={}).cpu_slots == 2


def test_process_environment_is_read_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBCELL_CPU_SLOTS", "5")
    settings = load_settings(None)
    assert settings.cpu_slots == 5
    assert settings.sources["cpu_slots"] == "env JOBCELL_CPU_SLOTS"


def test_environment_strings_are_parsed() -> None:
    env = {"JOBCELL_CPU_SLOTS": " AUTO ", "JOBCELL_NODE_MEMORY_MB": "4096",
           "JOBCELL_MAX_JOBS_PER_USER": "unlimited", "JOBCELL_RUNNER_REGISTRY_AUTOSYNC": "off",
           "JOBCELL_RUNNER_REGISTRY_PATHS": os.pathsep.join(["/a", "", "/b c"]),
           "JOBCELL_ADMIN_KEY": "s3cret", "JOBCELL_RETRY_BACKOFF_S": "0"}
    settings = load_settings(None, env=env)
    assert settings.cpu_slots == "auto"
    assert settings.node_memory_mb == 4096
    assert settings.max_jobs_per_user is None
    assert settings.runner_registry_autosync is False
    assert settings.runner_registry_paths == ["/a", "/b c"]
    assert settings.admin_key == "s3cret"
    assert settings.retry_backoff_s == 0.0


@pytest.mark.parametrize(("text", "expected"), [
    ("1", True), ("yes", True), ("ON", True), ("true", True),
    ("0", False), ("no", False), ("Off", False), ("false", False),
])
def test_booleans_from_text(text: str, expected: bool) -> None:
    env = {"JOBCELL_RUNNER_REGISTRY_AUTOSYNC": text}
    assert load_settings(None, env=env).runner_registry_autosync is expected


@pytest.mark.parametrize(("name", "raw"), [
    ("cpu_slots", 0), ("cpu_slots", -1), ("cpu_slots", "many"), ("cpu_slots", True),
    ("cpu_slots", 2.5), ("cpu_slots", float("inf")), ("node_memory_mb", "1.5"),
    ("memory_reserve_mb", -1), ("memory_reserve_mb", False), ("max_jobs_global", 0),
    ("max_jobs_per_user", 0), ("max_jobs_per_user", "lots"),
    ("poll_interval_s", 0), ("poll_interval_s", "nan"), ("poll_interval_s", True),
    ("retry_backoff_s", -0.1), ("retry_backoff_s", float("nan")), ("kill_grace_s", True),
    ("runner_registry_autosync", "maybe"), ("runner_registry_paths", [1, 2]),
    ("executor_backend", "kubernetes"), ("worker_heartbeat_ttl_s", "soon"),
])
def test_invalid_values_are_clear_errors(name: str, raw: Any) -> None:
    message = config_error(None, env={}, overrides={name: raw})
    assert message.startswith(f"override: option '{name}' expects {OPTIONS[name].expects}")
    assert repr(raw) in message


def test_integral_floats_are_accepted_as_integers() -> None:
    assert load_settings(None, env={}, overrides={"cpu_slots": 4.0}).cpu_slots == 4


def test_an_invalid_file_value_names_the_file_and_option(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'cpu_slots = "lots"\n')
    assert config_error(path, env={}) == (
        f"{path}: option 'cpu_slots' expects a positive integer or 'auto', got 'lots'")


def test_an_invalid_env_value_names_the_variable() -> None:
    message = config_error(None, env={"JOBCELL_MAX_JOBS_GLOBAL": "-5"})
    assert message == ("environment variable JOBCELL_MAX_JOBS_GLOBAL: option "
                       "'max_jobs_global' expects a positive integer, got '-5'")


def test_unknown_options(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "cpu_slot = 2\n")
    message = config_error(path, env={})
    assert f"{path}: unknown option 'cpu_slot'" in message
    assert "cpu_slots" in message, "the known options are listed"
    assert config_error(None, env={}, overrides={"nope": 1}) == "unknown option 'nope'"
    # Unknown JOBCELL_* variables (like JOBCELL_HOME) are not options and are ignored.
    assert load_settings(None, env={"JOBCELL_HOME": "/x", "JOBCELL_NOPE": "1"}).sources[
        "cpu_slots"] == "default"


def test_invalid_toml_is_a_clear_error(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "cpu_slots = = 2\n")
    assert config_error(path, env={}).startswith(f"{path}: not valid TOML")


def test_unreadable_config_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "jobcell.toml"
    path.mkdir()
    assert config_error(path, env={}).startswith(f"{path}: cannot read")


def test_describe_lists_every_option_and_masks_secrets() -> None:
    settings = load_settings(None, env={"JOBCELL_ADMIN_KEY": "s3cret"})
    rows = {row["name"]: row for row in settings.describe()}
    assert list(rows) == list(OPTIONS)
    assert rows["admin_key"] == {"name": "admin_key", "value": "********",
                                 "source": "env JOBCELL_ADMIN_KEY"}
    assert rows["cpu_slots"] == {"name": "cpu_slots", "value": "auto", "source": "default"}
    assert "s3cret" not in repr(settings.describe())
    unset = {row["name"]: row for row in load_settings(None, env={}).describe()}
    assert unset["admin_key"]["value"] is None


def test_unknown_attribute_is_an_attribute_error() -> None:
    settings = load_settings(None, env={})
    with pytest.raises(AttributeError):
        _ = settings.no_such_option
    assert not hasattr(settings, "no_such_option")


def test_settings_can_be_copied_and_pickled() -> None:
    settings = load_settings(None, env={}, overrides={"cpu_slots": 2})
    for clone in (copy.copy(settings), copy.deepcopy(settings),
                  pickle.loads(pickle.dumps(settings))):
        assert isinstance(clone, Settings)
        assert clone.cpu_slots == 2
        assert clone.sources == settings.sources
