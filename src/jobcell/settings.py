"""Cell options: defaults in code, then ``<home>/jobcell.toml``, then ``JOBCELL_<NAME>``."""

from __future__ import annotations

import json
import os
import posixpath
import shlex
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobcell.errors import ConfigError


def _integer(value: Any) -> int:
    # int() would silently truncate 2.5 and overflow on inf; neither is a valid count.
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError
    return int(value)


def _positive_int(value: Any) -> int:
    number = _integer(value)
    if number < 1:
        raise ValueError
    return number


def _non_negative_int(value: Any) -> int:
    number = _integer(value)
    if number < 0:
        raise ValueError
    return number


def _auto_or_positive_int(value: Any) -> int | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return _positive_int(value)


def _auto_or_non_negative_int(value: Any) -> int | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return _non_negative_int(value)


def _unlimited_or_positive_int(value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("unlimited", "inf")):
        return None
    return _positive_int(value)


MAX_DURATION = 100 * 366 * 86400.0  # a century: bigger means "never" and overflows dates


def _positive_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    number = float(value)
    if not 0 < number <= MAX_DURATION:
        raise ValueError
    return number


def _non_negative_float(value: Any) -> float:
    number = float(value)
    if not 0 <= number <= MAX_DURATION or isinstance(value, bool):  # also rejects NaN, inf
        raise ValueError
    return number


def _memory_factor(value: Any) -> float:
    number = _non_negative_float(value)
    if not 1.0 <= number <= 16.0:
        raise ValueError
    return number


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError


def _path_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [p for p in value.split(os.pathsep) if p]
    if isinstance(value, list) and all(isinstance(p, str) for p in value):
        return list(value)
    raise ValueError


def _backend(value: Any) -> str:
    if value not in ("embedded", "slurm", "external"):
        raise ValueError
    return str(value)


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or "\n" in value or "\0" in value:
        raise ValueError
    return value


def _text_list(value: Any) -> list[str]:
    """A list of strings (each one line), or a JSON list in an environment variable."""
    if isinstance(value, str):
        value = json.loads(value) if value.strip().startswith("[") else [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and "\0" not in v
                                              for v in value):
        raise ValueError
    return list(value)


def _command(value: Any) -> list[str] | None:
    """An argv: a TOML list, or a string split like a shell would split words (no shell
    ever runs it)."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip().startswith("[") else shlex.split(value)
        except ValueError:
            raise ValueError from None
    if not isinstance(value, list) or not value or \
            not all(isinstance(v, str) and v and "\0" not in v for v in value):
        raise ValueError
    return list(value)


def _mapping(value: Any) -> dict[str, str]:
    """A table of strings; in an environment variable a JSON object or ``A=B;C=D``."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            value = json.loads(text)
        else:
            pairs = [item.split("=", 1) for item in text.split(";") if item.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError
            value = {k.strip(): v.strip() for k, v in pairs}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str) for k, v in value.items()):
        raise ValueError
    return dict(value)


def _path_mappings(value: Any) -> dict[str, str]:
    mappings = _mapping(value)
    if not all(k.startswith("/") and v.startswith("/") for k, v in mappings.items()):
        raise ValueError
    # "/a//" and "/a/" mean "/a": one spelling, so prefix matching finds them.
    return {posixpath.normpath(k): posixpath.normpath(v) for k, v in mappings.items()}


def _port(value: Any) -> int:
    number = _integer(value)
    if not 1 <= number <= 65535:
        raise ValueError
    return number


def _choice(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in allowed:
            raise ValueError
        return str(value)
    return parse


def _optional_text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return str(value)


@dataclass(frozen=True)
class Option:
    """One cell option: default, parser, what a valid value looks like."""

    default: Any
    parse: Callable[[Any], Any]
    expects: str
    secret: bool = False


OPTIONS: dict[str, Option] = {
    "executor_backend": Option("embedded", _backend, "'embedded', 'slurm' or 'external'"),
    "cpu_slots": Option("auto", _auto_or_positive_int, "a positive integer or 'auto'"),
    "node_memory_mb": Option("auto", _auto_or_positive_int, "a positive integer or 'auto'"),
    "memory_reserve_mb": Option(2048, _non_negative_int, "a non-negative integer"),
    "gpu_count": Option("auto", _auto_or_non_negative_int, "a non-negative integer or 'auto'"),
    "max_jobs_global": Option(1_000_000, _positive_int, "a positive integer"),
    "max_jobs_per_user": Option(None, _unlimited_or_positive_int,
                                "a positive integer or 'unlimited'"),
    "runner_registry_paths": Option([], _path_list, "a list of paths"),
    "runner_registry_autosync": Option(True, _bool, "true or false"),
    "poll_interval_s": Option(0.2, _positive_float, "a positive number of seconds"),
    "admin_key": Option(None, _optional_text, "a string", secret=True),
    "upload_max_mb": Option(10240, _positive_int, "a positive integer (MiB)"),
    "download_url_ttl_s": Option(3600.0, _positive_float, "a positive number of seconds"),
    "callback_max_attempts": Option(6, _positive_int, "a positive integer"),
    "callback_backoff_s": Option(1.0, _non_negative_float, "a non-negative number of seconds"),
    "callback_timeout_s": Option(5.0, _positive_float, "a positive number of seconds"),
    "worker_idle_exit_s": Option(600.0, _non_negative_float,
                                 "a non-negative number of seconds (0 = never)"),
    "worker_heartbeat_ttl_s": Option(15.0, _positive_float, "a positive number of seconds"),
    "retry_backoff_s": Option(2.0, _non_negative_float, "a non-negative number of seconds"),
    "kill_grace_s": Option(5.0, _non_negative_float, "a non-negative number of seconds"),
    "oom_cooldown_s": Option(900.0, _non_negative_float, "a non-negative number of seconds"),
    "oom_throttle_hours": Option(24.0, _non_negative_float, "a non-negative number of hours"),
    "oom_throttle_max_concurrent": Option(1, _positive_int, "a positive integer"),
    "oom_memory_factor": Option(1.5, _memory_factor, "a number from 1 to 16 (1 = no raise)"),
    "gc_max_age_days": Option(30.0, _non_negative_float,
                              "a non-negative number of days (0 = keep forever)"),
    "gc_interval_s": Option(3600.0, _non_negative_float,
                            "a non-negative number of seconds (0 = only 'jobcell gc')"),
    # -- delegated backends (Slurm, external wrappers)
    "backend_poll_interval_s": Option(1.0, _positive_float, "a positive number of seconds"),
    "backend_poll_max_interval_s": Option(15.0, _positive_float,
                                          "a positive number of seconds"),
    "backend_exit_code_grace_s": Option(30.0, _non_negative_float,
                                        "a non-negative number of seconds"),
    "backend_max_submitted": Option(1000, _positive_int, "a positive integer"),
    "backend_path_mappings": Option({}, _path_mappings,
                                    "a table of absolute local prefix = backend prefix"),
    "slurm_sbatch": Option("sbatch", _text, "a program name or path"),
    "slurm_squeue": Option("squeue", _text, "a program name or path"),
    "slurm_sacct": Option("sacct", _text, "a program name or path"),
    "slurm_scancel": Option("scancel", _text, "a program name or path"),
    "slurm_sinfo": Option("sinfo", _text, "a program name or path"),
    "slurm_scontrol": Option("scontrol", _text, "a program name or path"),
    "slurm_partition": Option(None, _optional_text, "a partition name"),
    "slurm_account": Option(None, _optional_text, "an account name"),
    "slurm_qos": Option(None, _optional_text, "a QOS name"),
    "sbatch_extra": Option([], _text_list, "a list of sbatch arguments"),
    "slurm_script_shell": Option("/bin/bash", _text, "an absolute path to a shell"),
    "preparation_script_before": Option([], _text_list, "a list of script lines"),
    "preparation_script_after": Option([], _text_list, "a list of script lines"),
    "debug_slurm_script": Option(False, _bool, "true or false"),
    "slurm_max_array_size": Option(1000, _positive_int, "a positive integer"),
    "slurm_env": Option({}, _mapping, "a table of environment variables for Slurm commands"),
    "slurm_login_host": Option(None, _optional_text, "a host name"),
    "slurm_login_user": Option(None, _optional_text, "a user name"),
    "slurm_login_port": Option(22, _port, "a port number"),
    "slurm_ssh_key": Option(None, _optional_text, "a path to a private key"),
    "slurm_ssh_options": Option({}, _mapping, "a table of SSH options"),
    "slurm_tmp_io": Option(None, _optional_text,
                           "a directory seen by the login and compute nodes"),
    "slurm_tmp_io_local": Option(None, _optional_text,
                                 "the local mount of slurm_tmp_io"),
    "external_submit_cmd": Option(None, _command, "a command (list or words)"),
    "external_status_cmd": Option(None, _command, "a command (list or words)"),
    "external_cancel_cmd": Option(None, _command, "a command (list or words)"),
    "backend_capabilities_cmd": Option(None, _command, "a command (list or words)"),
    # -- containers
    "container_runtime": Option("auto", _choice("auto", "podman", "docker", "apptainer",
                                                 "singularity"),
                                "'auto', 'podman', 'docker', 'apptainer' or 'singularity'"),
    "container_pull": Option("missing", _choice("missing", "always", "never"),
                             "'missing', 'always' or 'never'"),
    "container_network": Option("none", _text, "a network name ('none' = no network)"),
}


@dataclass(frozen=True)
class Settings:
    """Effective cell options and where each value came from."""

    values: Mapping[str, Any]
    sources: Mapping[str, str] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            # copy/pickle probe dunders before ``values`` exists; looking it up would recurse.
            raise AttributeError(name)
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def describe(self) -> list[dict[str, Any]]:
        """Every option with its effective value and source (secrets masked)."""
        rows = []
        for name, option in OPTIONS.items():
            value = self.values[name]
            if option.secret and value is not None:
                value = "********"
            rows.append({"name": name, "value": value, "source": self.sources[name]})
        return rows


def _parse(name: str, raw: Any, where: str) -> Any:
    option = OPTIONS[name]
    try:
        return option.parse(raw)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where}: option '{name}' expects {option.expects}, got {raw!r}") from None


def load_settings(config_file: Path | None, env: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Any] | None = None) -> Settings:
    """Build the effective settings: defaults < config file < environment < overrides."""
    env = os.environ if env is None else env
    values = {name: option.default for name, option in OPTIONS.items()}
    sources = dict.fromkeys(OPTIONS, "default")
    for name, raw in _read_toml(config_file).items():
        if name not in OPTIONS:
            raise ConfigError(f"{config_file}: unknown option '{name}' "
                              f"(known: {', '.join(OPTIONS)})")
        values[name] = _parse(name, raw, str(config_file))
        sources[name] = f"file {config_file}"
    for name in OPTIONS:
        key = f"JOBCELL_{name.upper()}"
        if key in env:
            values[name] = _parse(name, env[key], f"environment variable {key}")
            sources[name] = f"env {key}"
    for name, raw in (overrides or {}).items():
        if name not in OPTIONS:
            raise ConfigError(f"unknown option '{name}'")
        values[name] = _parse(name, raw, "override")
        sources[name] = "override"
    return Settings(values, sources)


def _read_toml(path: Path | None) -> dict[str, Any]:
    if path is None or not path.exists():
        return {}
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return data.get("jobcell", data) if isinstance(data.get("jobcell"), dict) else data
