"""SlurmBackend without a cluster: ssh_extra translation, argument checks, the default
home, and how its options are written into (and guarded in) the cell's jobcell.toml."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from jobcell.client import SlurmBackend as ClientSlurmBackend
from jobcell.client.slurm import (
    STATE_FILE,
    SlurmBackend,
    SlurmConfigError,
    configure_home,
    default_home,
    dump_toml,
    parse_ssh_extra,
)
from jobcell.config import SlurmBackend as ConfigSlurmBackend
from jobcell.errors import ConfigError
from jobcell.home import open_home
from jobcell.service import Cell


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "id_test"
    path.write_text("not really a key\n")
    return path


def backend(tmp_path: Path, **kwargs: Any) -> SlurmBackend:
    kwargs.setdefault("home", tmp_path / "cell")
    return SlurmBackend(kwargs.pop("login_host", "login.example.org"),
                        kwargs.pop("slurm_tmp_io", "/scratch/jobcell"), **kwargs)


def toml(home: Path) -> dict[str, Any]:
    return tomllib.loads((home / "jobcell.toml").read_text())


# --- ssh_extra ---------------------------------------------------------------------------


def test_the_seed_example_translates(key: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(key.parent)
    parsed = parse_ssh_extra(["-o", "StrictHostKeyChecking=no", "-i", "id_test",
                              "-p", "2222"])
    assert parsed.options == {"StrictHostKeyChecking": "no"}
    assert parsed.key == str(key)          # absolute: the worker runs in the cell home
    assert parsed.port == 2222 and parsed.user is None


def test_attached_values_and_other_forms(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    parsed = parse_ssh_extra(["-oUserKnownHostsFile=known", "-o", "ServerAliveInterval 15",
                              "-p2200", "-lalice", "-J", "bastion", "-C", "-T", "-x", "-q",
                              "-a", "-n", "-ifirst", "-i", "second", "-o", "Port=2200",
                              "-o", "User=alice", "-o", "IdentityFile=third"])
    assert parsed.options == {
        "UserKnownHostsFile": str(tmp_path / "known"), "ServerAliveInterval": "15",
        "ProxyJump": "bastion", "Compression": "yes",
        "IdentityFile": f"{tmp_path / 'second'} {tmp_path / 'third'}"}
    assert parsed.key == str(tmp_path / "first")
    assert (parsed.port, parsed.user) == (2200, "alice")
    assert parse_ssh_extra(None).options == {} and parse_ssh_extra([]).key is None


@pytest.mark.parametrize(("args", "message"), [
    (["-X"], "unsupported ssh argument '-X'"),
    (["-F", "config"], "unsupported ssh argument '-F'"),
    (["login.example.org"], "unsupported ssh argument 'login.example.org'"),
    (["-qT"], "unsupported ssh argument '-qT'"),
    (["-o"], "'-o' needs a value"),
    (["-o", "StrictHostKeyChecking"], "is not an option"),
    (["-p", "ssh"], "the port must be a number"),
    (["-p", "70000"], "the port must be a number"),
    (["-p", "22", "-p", "2222"], "already 22"),
    (["-l", "a", "-o", "User=b"], "already 'a'"),
    (["-o", "HostName=other"], "the host is login_host"),
    (["-o", "ConnectTimeout=5", "-o", "ConnectTimeout=9"], "sets ConnectTimeout again"),
    (["-o", "UserKnownHostsFile=a b"], "paths with spaces"),
    ("-p 22", "must be a list of strings"),
    ([22], "must be a list of strings"),
])
def test_unsupported_ssh_arguments_are_refused(args: Any, message: str) -> None:
    with pytest.raises(SlurmConfigError, match=message):
        parse_ssh_extra(args)


def test_unknown_ssh_options_are_refused_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown SSH option 'Foo'"):
        backend(tmp_path, ssh_extra=["-o", "Foo=bar"])
    with pytest.raises(ValueError, match="StrictHostKeyChecking=accept-new"):
        backend(tmp_path, ssh_extra=["-o", "StrictHostKeyChecking=accept-new"])


# --- the arguments -----------------------------------------------------------------------


def test_options_written_for_the_cell(tmp_path: Path, key: Path) -> None:
    made = backend(tmp_path, login_user="bob", slurm_tmp_io="/scratch//io/",
                   ssh_extra=["-o", "StrictHostKeyChecking=no", "-i", str(key), "-p", "2222"],
                   sbatch_extra=["--constraint=avx2"], slurm_script_shell="/bin/sh",
                   preparation_script_before=["module load x"],
                   preparation_script_after=["echo after"], debug_slurm_script=True,
                   partition="short", settings={"slurm_account": "lab", "slurm_qos": None})
    assert made.options == {
        "executor_backend": "slurm", "slurm_login_host": "login.example.org",
        "slurm_login_user": "bob", "slurm_login_port": 2222, "slurm_ssh_key": str(key),
        "slurm_ssh_options": {"StrictHostKeyChecking": "no"},
        "slurm_tmp_io": "/scratch/io", "slurm_tmp_io_local": None,
        "sbatch_extra": ["--constraint=avx2"], "slurm_script_shell": "/bin/sh",
        "preparation_script_before": ["module load x"],
        "preparation_script_after": ["echo after"], "debug_slurm_script": True,
        "slurm_partition": "short", "slurm_account": "lab"}
    assert made.identity == f"slurm:bob@login.example.org:{tmp_path / 'cell'}"
    assert repr(made) == ("SlurmBackend(login_host='login.example.org', login_user='bob', "
                          f"login_port=2222, slurm_tmp_io='/scratch/io', "
                          f"home='{tmp_path / 'cell'}')")
    assert (made.poll_interval_s, made.max_poll_interval_s) == (0.5, 5.0)
    assert ClientSlurmBackend is ConfigSlurmBackend is SlurmBackend


def test_user_at_host(tmp_path: Path) -> None:
    made = backend(tmp_path, login_host="carol@login")
    assert (made.login_host, made.login_user) == ("login", "carol")
    assert made.identity.startswith("slurm:carol@login:")
    assert backend(tmp_path).identity.startswith("slurm:@login.example.org:")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"login_host": ""}, "login_host must be a host name"),
    ({"login_host": "two words"}, "login_host must be a host name"),
    ({"login_host": "-oProxyCommand=x"}, "login_host must be a host name"),
    ({"login_host": "a@b", "login_user": "c"}, "names user 'a' but login_user is 'c'"),
    ({"slurm_tmp_io": "relative/io"}, "slurm_tmp_io must be an absolute path"),
    ({"slurm_tmp_io": ""}, "slurm_tmp_io must be an absolute path"),
    ({"slurm_tmp_io_local": "/does/not/exist"}, "is not a directory here"),
    ({"login_user": "a b"}, "login_user must be a user name"),
    ({"login_user": "a", "ssh_extra": ["-l", "b"]}, "name different users"),
    ({"login_port": 0}, "login_port must be a number 1-65535"),
    ({"login_port": True}, "login_port must be a number 1-65535"),
    ({"login_port": 22, "ssh_extra": ["-p", "2222"]}, "name different ports"),
    ({"ssh_key": "/no/such/key"}, "is not a readable file"),
    ({"sbatch_extra": "--exclusive"}, "sbatch_extra must be a list of strings"),
    ({"preparation_script_before": "module load x"}, "must be a list of strings"),
    ({"preparation_script_after": [1]}, "must be a list of strings"),
    ({"slurm_script_shell": "bash"}, "slurm_script_shell must be an absolute path"),
    ({"debug_slurm_script": "yes"}, "debug_slurm_script must be True or False"),
    ({"partition": ""}, "partition must be a partition name"),
    ({"poll_interval_s": 0}, "poll_interval_s must be a positive number"),
    ({"settings": {"slurm_tmp_io": "/x"}}, "set by the SlurmBackend argument slurm_tmp_io"),
    ({"settings": {"executor_backend": "embedded"}}, "option 'executor_backend' is set by"),
    ({"settings": {"no_such_option": 1}}, "unknown cell option 'no_such_option'"),
    ({"settings": {"backend_poll_interval_s": -1}},
     "option 'backend_poll_interval_s' expects a positive number"),
    ({"settings": {"slurm_env": {"A": object()}}}, "cannot be written to jobcell.toml"),
    ({"settings": ["slurm_account"]}, "settings must be a dict"),
])
def test_bad_arguments_are_refused_clearly(tmp_path: Path, kwargs: dict[str, Any],
                                           message: str) -> None:
    with pytest.raises(SlurmConfigError, match=message) as caught:
        backend(tmp_path, **kwargs)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, ConfigError)


def test_the_default_home_is_dedicated_and_follows_xdg(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOBCELL_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    made = SlurmBackend("login.example.org", "/scratch/io")
    assert made.home == tmp_path / "xdg" / "jobcell" / "slurm-login.example.org"
    assert default_home("h", "u", 2222) == tmp_path / "xdg" / "jobcell" / "slurm-u@h-2222"
    assert default_home("h", None, 22) == tmp_path / "xdg" / "jobcell" / "slurm-h"
    monkeypatch.setenv("JOBCELL_HOME", str(tmp_path / "main"))
    assert default_home("h") == tmp_path / "main" / "slurm-h"
    assert not made.home.exists()    # cheap to construct: nothing is written yet


# --- the cell's jobcell.toml -------------------------------------------------------------


def test_opening_the_cell_writes_its_options(tmp_path: Path) -> None:
    made = backend(tmp_path, sbatch_extra=["--comment=x"],
                   settings={"slurm_env": {"SLURM_CONF": "/etc/slurm.conf"}})
    try:
        cell = made.cell
        assert cell.settings.executor_backend == "slurm"
        assert cell.settings.sources["slurm_tmp_io"].startswith("file ")
    finally:
        made.close()
    written = toml(tmp_path / "cell")
    assert written["slurm_login_host"] == "login.example.org"
    assert written["slurm_env"] == {"SLURM_CONF": "/etc/slurm.conf"}
    assert "slurm_partition" not in written and "slurm_login_user" not in written
    state = json.loads((tmp_path / "cell" / STATE_FILE).read_text())["written"]
    assert state == written
    # A separate process (the worker) sees the same options.
    with Cell(tmp_path / "cell", auto_worker=False) as fresh:
        assert fresh.settings.sbatch_extra == ["--comment=x"]
        assert fresh.settings.slurm_env == {"SLURM_CONF": "/etc/slurm.conf"}


def test_other_options_in_the_file_are_kept(tmp_path: Path) -> None:
    home = tmp_path / "cell"
    home.mkdir()
    (home / "jobcell.toml").write_text("# mine\ncpu_slots = 3\ngc_max_age_days = 7.5\n")
    made = backend(tmp_path)
    made.cell.close()
    written = toml(home)
    assert written["cpu_slots"] == 3 and written["gc_max_age_days"] == 7.5
    assert written["executor_backend"] == "slurm"


def test_a_jobcell_table_stays_a_table(tmp_path: Path) -> None:
    home = tmp_path / "cell"
    home.mkdir()
    (home / "jobcell.toml").write_text("[jobcell]\ncpu_slots = 3\n\n[other]\nx = 1\n")
    backend(tmp_path).cell.close()
    written = toml(home)
    assert written["jobcell"]["cpu_slots"] == 3
    assert written["jobcell"]["executor_backend"] == "slurm"
    assert written["other"] == {"x": 1}
    with Cell(home, auto_worker=False) as cell:
        assert cell.settings.executor_backend == "slurm" and cell.settings.cpu_slots == 3


def test_a_value_someone_else_wrote_is_not_overwritten(tmp_path: Path) -> None:
    home = tmp_path / "cell"
    home.mkdir()
    (home / "jobcell.toml").write_text('executor_backend = "embedded"\n'
                                       'slurm_partition = "long"\n')
    with pytest.raises(ConfigError, match=r"already sets executor_backend = \"embedded\", "
                                          r"slurm_partition = \"long\""):
        _ = backend(tmp_path).cell
    assert toml(home) == {"executor_backend": "embedded", "slurm_partition": "long"}
    # The same values are fine (and become the backend's).
    (home / "jobcell.toml").write_text('executor_backend = "slurm"\n'
                                       'slurm_partition = "long"\n')
    backend(tmp_path, partition="long").cell.close()
    assert toml(home)["slurm_partition"] == "long"


def test_its_own_values_follow_the_arguments(tmp_path: Path) -> None:
    home = tmp_path / "cell"
    backend(tmp_path, debug_slurm_script=True, partition="short",
            settings={"slurm_account": "lab"}).cell.close()
    assert toml(home)["debug_slurm_script"] is True
    backend(tmp_path).cell.close()
    written = toml(home)
    assert written["debug_slurm_script"] is False
    assert "slurm_partition" not in written and "slurm_account" not in written
    # Unchanged arguments: the file is not rewritten.
    before = (home / "jobcell.toml").stat().st_mtime_ns
    assert configure_home(open_home(home), backend(tmp_path).options) is False
    assert (home / "jobcell.toml").stat().st_mtime_ns == before


def test_a_dropped_setting_edited_by_hand_is_left_alone(tmp_path: Path) -> None:
    home = tmp_path / "cell"
    backend(tmp_path, settings={"slurm_account": "lab"}).cell.close()
    text = (home / "jobcell.toml").read_text().replace('"lab"', '"other"')
    (home / "jobcell.toml").write_text(text)
    backend(tmp_path).cell.close()
    assert toml(home)["slurm_account"] == "other"


def test_an_environment_override_is_refused(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBCELL_SLURM_PARTITION", "debug")
    with pytest.raises(ConfigError, match=r"'slurm_partition'.*env JOBCELL_SLURM_PARTITION"):
        _ = backend(tmp_path).cell
    monkeypatch.setenv("JOBCELL_SLURM_PARTITION", "short")
    backend(tmp_path, partition="short").cell.close()


def test_dump_toml_reads_back() -> None:
    document = {"a": 1, "b": 2.5, "c": True, "d": ["x", 'q"uote', "tab\t", "del\x7f", "é"],
                "e": {"K=V": "a\\b", "plain": "line\nbreak"}, "f": {},
                "jobcell": {"k": [1, 2], "t": {"x": "y"}}}
    text = dump_toml(document, "header")
    assert text.startswith("# header\n")
    assert tomllib.loads(text) == document


def test_an_existing_cell_is_not_turned_into_a_slurm_cell(tmp_path: Path) -> None:
    home = tmp_path / "cell"
    Cell(home, auto_worker=False).close()            # the user's own (embedded) cell
    with pytest.raises(ConfigError, match="existing cell \\(executor 'embedded'\\)"):
        _ = backend(tmp_path).cell
    assert not (home / "jobcell.toml").exists()
    # Once the cell says it is a Slurm cell, the backend takes it over.
    (home / "jobcell.toml").write_text('executor_backend = "slurm"\n')
    backend(tmp_path).cell.close()
    assert toml(home)["slurm_login_host"] == "login.example.org"
    assert (home / STATE_FILE).exists()
