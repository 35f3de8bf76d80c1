"""Scheduler options (GPUs, OOM cooldowns and throttles, garbage collection): parsing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from jobcell.errors import ConfigError
from jobcell.settings import OPTIONS, load_settings

SCHEDULER_OPTIONS = ("gpu_count", "oom_cooldown_s", "oom_throttle_hours",
                     "oom_throttle_max_concurrent", "oom_memory_factor", "gc_max_age_days",
                     "gc_interval_s")


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "jobcell.toml"
    path.write_text(text)
    return path


def config_error(*args: Any, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(*args, **kwargs)
    return str(info.value)


def test_defaults() -> None:
    settings = load_settings(None, env={})
    assert settings.gpu_count == "auto"
    assert settings.oom_cooldown_s == 900.0
    assert settings.oom_throttle_hours == 24.0
    assert settings.oom_throttle_max_concurrent == 1
    assert settings.oom_memory_factor == 1.5
    assert settings.gc_max_age_days == 30.0
    assert settings.gc_interval_s == 3600.0
    assert all(settings.sources[name] == "default" for name in SCHEDULER_OPTIONS)


def test_every_option_is_described() -> None:
    names = [row["name"] for row in load_settings(None, env={}).describe()]
    assert set(SCHEDULER_OPTIONS) <= set(names)


def test_options_from_the_config_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "gpu_count = 2\noom_cooldown_s = 60\noom_throttle_hours = 0.5\n"
                                "oom_throttle_max_concurrent = 3\noom_memory_factor = 2\n"
                                "gc_max_age_days = 7\ngc_interval_s = 0\n")
    settings = load_settings(path, env={})
    assert settings.gpu_count == 2
    assert settings.oom_cooldown_s == 60.0
    assert settings.oom_throttle_hours == 0.5
    assert settings.oom_throttle_max_concurrent == 3
    assert settings.oom_memory_factor == 2.0
    assert settings.gc_max_age_days == 7.0
    assert settings.gc_interval_s == 0.0
    assert all(settings.sources[name] == f"file {path}" for name in SCHEDULER_OPTIONS)


def test_options_in_a_jobcell_table(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[jobcell]\ngpu_count = "auto"\noom_memory_factor = 1.0\n')
    settings = load_settings(path, env={})
    assert settings.gpu_count == "auto"
    assert settings.oom_memory_factor == 1.0


def test_options_from_the_environment() -> None:
    env = {"JOBCELL_GPU_COUNT": "0", "JOBCELL_OOM_COOLDOWN_S": "30.5",
           "JOBCELL_OOM_THROTTLE_HOURS": "0", "JOBCELL_OOM_THROTTLE_MAX_CONCURRENT": "2",
           "JOBCELL_OOM_MEMORY_FACTOR": "16", "JOBCELL_GC_MAX_AGE_DAYS": "0",
           "JOBCELL_GC_INTERVAL_S": "120"}
    settings = load_settings(None, env=env)
    assert settings.gpu_count == 0
    assert settings.oom_cooldown_s == 30.5
    assert settings.oom_throttle_hours == 0.0
    assert settings.oom_throttle_max_concurrent == 2
    assert settings.oom_memory_factor == 16.0
    assert settings.gc_max_age_days == 0.0
    assert settings.gc_interval_s == 120.0
    for name in SCHEDULER_OPTIONS:
        assert settings.sources[name] == f"env JOBCELL_{name.upper()}"


def test_the_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "oom_cooldown_s = 60\ngpu_count = 4\n")
    settings = load_settings(path, env={"JOBCELL_OOM_COOLDOWN_S": "5",
                                        "JOBCELL_GPU_COUNT": " Auto "})
    assert settings.oom_cooldown_s == 5.0
    assert settings.sources["oom_cooldown_s"] == "env JOBCELL_OOM_COOLDOWN_S"
    assert settings.gpu_count == "auto"


@pytest.mark.parametrize(("name", "raw"), [
    ("gpu_count", -1), ("gpu_count", "some"), ("gpu_count", 1.5), ("gpu_count", True),
    ("oom_cooldown_s", -1), ("oom_cooldown_s", "soon"), ("oom_cooldown_s", float("nan")),
    ("oom_cooldown_s", True),
    ("oom_throttle_hours", -0.5), ("oom_throttle_hours", "a day"),
    ("oom_throttle_max_concurrent", 0), ("oom_throttle_max_concurrent", -2),
    ("oom_throttle_max_concurrent", 1.5), ("oom_throttle_max_concurrent", "one"),
    ("oom_throttle_max_concurrent", False),
    ("oom_memory_factor", 0.5), ("oom_memory_factor", 0), ("oom_memory_factor", 16.5),
    ("oom_memory_factor", -2), ("oom_memory_factor", "double"),
    ("oom_memory_factor", float("inf")), ("oom_memory_factor", float("nan")),
    ("oom_memory_factor", True),
    ("gc_max_age_days", -1), ("gc_max_age_days", "forever"),
    ("gc_interval_s", -10), ("gc_interval_s", "hourly"), ("gc_interval_s", False),
])
def test_invalid_values_are_clear_errors(name: str, raw: Any) -> None:
    message = config_error(None, env={}, overrides={name: raw})
    assert message.startswith(f"override: option '{name}' expects {OPTIONS[name].expects}")
    assert repr(raw) in message


@pytest.mark.parametrize("factor", [1, 1.0, 2.5, 16, "16.0"])
def test_memory_factor_range_is_inclusive(factor: Any) -> None:
    settings = load_settings(None, env={}, overrides={"oom_memory_factor": factor})
    assert settings.oom_memory_factor == float(factor)


def test_an_invalid_file_value_names_the_file_and_option(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "oom_memory_factor = 20\n")
    assert config_error(path, env={}) == (
        f"{path}: option 'oom_memory_factor' expects a number from 1 to 16 (1 = no raise), "
        "got 20")


@pytest.mark.parametrize(("variable", "raw", "option"), [
    ("JOBCELL_OOM_COOLDOWN_S", "-5", "oom_cooldown_s"),
    ("JOBCELL_OOM_THROTTLE_HOURS", "x", "oom_throttle_hours"),
    ("JOBCELL_OOM_THROTTLE_MAX_CONCURRENT", "0", "oom_throttle_max_concurrent"),
    ("JOBCELL_OOM_MEMORY_FACTOR", "0.9", "oom_memory_factor"),
    ("JOBCELL_GPU_COUNT", "-1", "gpu_count"),
    ("JOBCELL_GC_MAX_AGE_DAYS", "nan", "gc_max_age_days"),
    ("JOBCELL_GC_INTERVAL_S", "", "gc_interval_s"),
])
def test_an_invalid_env_value_names_the_variable_and_option(
        variable: str, raw: str, option: str) -> None:
    message = config_error(None, env={variable: raw})
    assert message == (f"environment variable {variable}: option '{option}' expects "
                       f"{OPTIONS[option].expects}, got {raw!r}")


@pytest.mark.parametrize("name", ["oom_cooldown_s", "oom_throttle_hours", "gc_max_age_days",
                                  "gc_interval_s", "poll_interval_s", "kill_grace_s"])
@pytest.mark.parametrize("value", ["inf", "1e300", "nan"])
def test_durations_must_be_finite_and_representable(name: str, value: str) -> None:
    # An infinite cooldown would end at a date no status view can print.
    message = config_error(None, env={f"JOBCELL_{name.upper()}": value})
    assert name in message and value in message


def test_status_times_far_in_the_future_still_print() -> None:
    from jobcell.service import iso

    assert iso(1e300) == "9999-12-31T23:59:59.000Z"
    assert iso(-5.0) == "1970-01-01T00:00:00.000Z"
