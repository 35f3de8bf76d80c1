"""`jobcell config show`: defaults < <home>/jobcell.toml < JOBCELL_<NAME> environment."""

from __future__ import annotations

from typing import Any

from .helpers import Cli


def _options(cli: Cli, env: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    shown = cli.json("config", "show", env=env)
    assert shown["home"] == str(cli.home)
    return {row["name"]: row for row in shown["options"]}


def test_config_sources(bare_cli: Cli) -> None:
    defaults = _options(bare_cli)
    assert {"executor_backend", "cpu_slots", "node_memory_mb", "memory_reserve_mb",
            "max_jobs_global", "max_jobs_per_user", "runner_registry_paths",
            "runner_registry_autosync", "poll_interval_s", "admin_key"} <= set(defaults)
    assert all(row["source"] == "default" for row in defaults.values())
    assert defaults["cpu_slots"]["value"] == "auto"
    assert defaults["memory_reserve_mb"]["value"] == 2048
    assert defaults["admin_key"]["value"] is None

    config = bare_cli.home / "jobcell.toml"
    config.write_text('cpu_slots = 3\nmemory_reserve_mb = 512\nadmin_key = "s3cret-key"\n'
                      'runner_registry_paths = ["/opt/runners"]\n')
    from_file = _options(bare_cli)
    assert from_file["cpu_slots"] == {"name": "cpu_slots", "value": 3,
                                      "source": f"file {config}"}
    assert from_file["memory_reserve_mb"]["value"] == 512
    assert from_file["runner_registry_paths"]["value"] == ["/opt/runners"]
    assert from_file["admin_key"]["value"] == "********"
    assert from_file["admin_key"]["source"] == f"file {config}"
    assert from_file["poll_interval_s"]["source"] == "default"

    env = {"JOBCELL_CPU_SLOTS": "2", "JOBCELL_MAX_JOBS_PER_USER": "7",
           "JOBCELL_RUNNER_REGISTRY_PATHS": "/a:/b", "JOBCELL_ADMIN_KEY": "env-secret"}
    shown = bare_cli.run("config", "show", "--json", env=env)
    assert "env-secret" not in shown.stdout and "s3cret-key" not in shown.stdout
    from_env = {row["name"]: row for row in shown.json["options"]}
    assert from_env["cpu_slots"] == {"name": "cpu_slots", "value": 2,
                                     "source": "env JOBCELL_CPU_SLOTS"}  # env wins over file
    assert from_env["max_jobs_per_user"]["value"] == 7
    assert from_env["runner_registry_paths"]["value"] == ["/a", "/b"]
    assert from_env["admin_key"]["value"] == "********"
    assert from_env["admin_key"]["source"] == "env JOBCELL_ADMIN_KEY"
    assert from_env["memory_reserve_mb"]["source"] == f"file {config}"

    text = bare_cli.ok("config", "show", env=env)
    assert "env JOBCELL_CPU_SLOTS" in text.stdout and str(bare_cli.home) in text.stdout
    assert "env-secret" not in text.stdout + text.stderr
    # The effective values are what the cell uses.
    assert bare_cli.json("capabilities", env=env)["cpu_slots"] == 2


def test_home_from_environment(bare_cli: Cli) -> None:
    shown = bare_cli.json("config", "show", home=False,
                          env={"JOBCELL_HOME": str(bare_cli.home)})
    assert shown["home"] == str(bare_cli.home)
    for name in ("state.db", "artifacts", "runners", "staging", "publish", "locks"):
        assert (bare_cli.home / name).exists(), name
