"""The SSH transport against a real OpenSSH server on 127.0.0.1 (the ``sshd_server`` fixture).

The server runs on this machine, so "remote" paths are local paths under ``tmp_path`` and
the server's processes can be inspected (and killed, to drop a connection) with psutil.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncssh
import psutil
import pytest

from jobcell.executors.ssh import SSHTransport
from jobcell.executors.transport import TransportError
from jobcell.settings import load_settings

HOSTILE = [
    "plain", "two words", "it's", 'say "hi"', "$(touch /tmp/jobcell-pwned)", "`id`",
    "a;b", "a|b", "a&&b", "new\nline", "tab\there", "*", "~", "$HOME", "!!", "\\back\\",
    "--dash", "-n", "", " ", "ünïcödé ✓", "'\"'\"'", "x=y", "#comment", "{a,b}", ">out",
]


def make(server: Any, **kwargs: Any) -> SSHTransport:
    options = {"UserKnownHostsFile": str(server.known_hosts), **kwargs.pop("options", {})}
    kwargs.setdefault("key_path", str(server.key_path))
    return SSHTransport(server.host, user=server.user, port=server.port, options=options,
                        **kwargs)


@pytest.fixture
def ssh_log() -> io.StringIO:
    return io.StringIO()


@pytest.fixture
def transport(sshd_server: Any, ssh_log: io.StringIO) -> Iterator[SSHTransport]:
    with make(sshd_server, log=ssh_log) as opened:
        yield opened


def our_connections(port: int) -> int:
    """Established TCP connections from this process to ``port``."""
    return sum(1 for c in psutil.Process().net_connections(kind="tcp")
               if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def server_sessions(port: int) -> list[psutil.Process]:
    """The sshd processes serving this process's connections to ``port``."""
    ours = {c.laddr.port for c in psutil.Process().net_connections(kind="tcp")
            if c.raddr and c.raddr.port == port}
    pids = {c.pid for c in psutil.net_connections(kind="tcp")
            if c.pid and c.pid != os.getpid() and c.laddr and c.laddr.port == port
            and c.raddr and c.raddr.port in ours}
    sessions = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            sessions.append(psutil.Process(pid))
    return sessions


def drop_server_side(port: int) -> int:
    """Kill the sshd processes serving this process's connections to ``port`` (and what
    they run): the connection drops as when a login node reboots. Returns how many."""
    victims = server_sessions(port)
    processes = []
    for session in victims:
        with contextlib.suppress(psutil.Error):
            processes += [session, *session.children(recursive=True)]  # no orphans left
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(processes, timeout=3)
    return len(victims)


def assert_one_outage(log: str) -> None:
    lines = log.splitlines()
    assert len(lines) == 2, log
    assert "lost" in lines[0] and "restored" in lines[1], log


def split0(text: str) -> list[str]:
    assert text.endswith("\0")
    return text[:-1].split("\0")


# -- options and construction (no server needed)


def test_unknown_option_is_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="Frobnicate"):
        SSHTransport("login", options={"Frobnicate": "yes"})


@pytest.mark.parametrize(("options", "match"), [
    ({"ServerAliveInterval": "soon"}, "ServerAliveInterval"),
    ({"Compression": "maybe"}, "Compression"),
    ({"StrictHostKeyChecking": "accept-new"}, "accept-new"),
    ({"User": "bob"}, "slurm_login_user"),
    ({"Port": "2222"}, "slurm_login_port"),
    ({"Ciphers": "+aes128-ctr"}, "Ciphers"),
])
def test_bad_option_values_are_rejected(options: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SSHTransport("login", options=options)


def test_options_map_onto_connect_arguments() -> None:
    transport = SSHTransport("login", key_path="/k", connect_timeout=3, options={
        "stricthostkeychecking": "no", "ServerAliveInterval": "7", "ServerAliveCountMax": "2",
        "ConnectTimeout": "4", "Compression": "yes", "TCPKeepAlive": "no",
        "LogLevel": "ERROR", "BatchMode": "yes"})
    settings = transport._settings
    assert settings.check_host_key is False
    assert settings.connect_timeout == 4.0
    assert settings.key_files == ["/k"] and settings.use_agent is False
    assert settings.kwargs["keepalive_interval"] == 7.0
    assert settings.kwargs["keepalive_count_max"] == 2
    assert settings.kwargs["compression_algs"][0] == "zlib@openssh.com"
    assert settings.kwargs["tcp_keepalive"] is False
    transport.close()


def test_from_settings_and_description() -> None:
    settings = load_settings(None, env={}, overrides={
        "slurm_login_host": "login.example", "slurm_login_user": "alice",
        "slurm_login_port": 2222, "slurm_ssh_options": {"ServerAliveInterval": "5"}})
    with SSHTransport.from_settings(settings) as transport:
        assert transport.description == "ssh alice@login.example:2222"
        assert transport._settings.kwargs["keepalive_interval"] == 5.0
    with pytest.raises(ValueError, match="slurm_login_host"):
        SSHTransport.from_settings(load_settings(None, env={}))
    with pytest.raises(ValueError, match="Bogus"):
        SSHTransport.from_settings(load_settings(None, env={}, overrides={
            "slurm_login_host": "h", "slurm_ssh_options": {"Bogus": "1"}}))


def test_silent_server_times_out_with_backoff() -> None:
    """A port that accepts but never speaks SSH: the connect timeout applies, then the
    backoff answers at once."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        log = io.StringIO()
        with SSHTransport("127.0.0.1", port=port, connect_timeout=1.0, log=log,
                          options={"StrictHostKeyChecking": "no"}) as transport:
            started = time.monotonic()
            with pytest.raises(TransportError, match=rf"127\.0\.0\.1:{port}.*timed out"):
                transport.run(["true"])
            assert 0.9 < time.monotonic() - started < 4
            started = time.monotonic()
            with pytest.raises(TransportError, match="next attempt in"):
                transport.write_file("/tmp/never", b"x")
            assert time.monotonic() - started < 0.5
            assert transport.connect_attempts == 1
        assert log.getvalue().count("\n") == 1 and "unavailable" in log.getvalue()


# -- commands


@pytest.mark.ssh
def test_hostile_arguments_arrive_byte_exact(transport: SSHTransport) -> None:
    result = transport.run(["printf", "%s\\0", *HOSTILE])
    assert result.returncode == 0, result.describe()
    assert split0(result.stdout) == HOSTILE
    assert not Path("/tmp/jobcell-pwned").exists()


@pytest.mark.ssh
def test_env_values_arrive_byte_exact(transport: SSHTransport) -> None:
    env = {f"JC_V{i}": value for i, value in enumerate(HOSTILE)}
    script = "printf '%s\\0' " + " ".join(f'"$JC_V{i}"' for i in range(len(HOSTILE)))
    result = transport.run(["sh", "-c", script], env=env)
    assert split0(result.stdout) == HOSTILE
    with pytest.raises(ValueError, match="environment variable"):
        transport.run(["true"], env={"BAD NAME": "x"})


@pytest.mark.ssh
def test_exit_codes_signals_and_stderr(transport: SSHTransport) -> None:
    result = transport.run(["sh", "-c", "echo out; echo err >&2; exit 42"])
    assert (result.returncode, result.stdout, result.stderr) == (42, "out\n", "err\n")
    assert result.argv == ("sh", "-c", "echo out; echo err >&2; exit 42")
    assert transport.run(["sh", "-c", "kill -KILL $$"]).returncode == 128 + 9
    assert transport.run(["sh", "-c", "kill -TERM $$"]).returncode == 128 + 15
    assert transport.run(["true"]).ok


@pytest.mark.ssh
def test_stdin_input(transport: SSHTransport) -> None:
    text = "line one\nsecond 'line' $(x)\nünï\n"
    assert transport.run(["cat"], input_text=text).stdout == text
    started = time.monotonic()
    assert transport.run(["cat"]).stdout == ""  # no input: stdin is at EOF, no hang
    assert transport.run(["cat"], input_text="").stdout == ""
    assert time.monotonic() - started < 5


@pytest.mark.ssh
def test_missing_program_and_timeout_raise_transport_error(transport: SSHTransport) -> None:
    with pytest.raises(TransportError, match=r"jc-no-such-program.*not found"):
        transport.run(["jc-no-such-program", "x"])
    with pytest.raises(TransportError, match="jc-no-such-program"):
        transport.run(["jc-no-such-program"], env={"A": "1"})
    started = time.monotonic()
    with pytest.raises(TransportError, match=r"did not answer in 0\.5 s"):
        transport.run(["sleep", "3"], timeout=0.5)
    assert time.monotonic() - started < 3
    assert transport.run(["echo", "still fine"]).stdout == "still fine\n"
    assert transport.connections_opened == 1


@pytest.mark.ssh
def test_fifty_concurrent_runs_share_one_connection(sshd_server: Any,
                                                    transport: SSHTransport) -> None:
    transport.run(["true"])
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(our_connections(sshd_server.port))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(50) as pool:
            results = list(pool.map(
                lambda i: transport.run(["sh", "-c", 'sleep 0.2; echo "$0"', str(i)]),
                range(50)))
    finally:
        stop.set()
        watcher.join()
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(50)]
    assert transport.connect_attempts == transport.connections_opened == 1
    assert seen and max(seen) == 1


# -- files


@pytest.mark.ssh
def test_write_and_read_file(transport: SSHTransport, tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "file.bin"
    data = bytes(range(256)) * 1000
    transport.write_file(str(target), data, 0o640)
    assert transport.read_file(str(target)) == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    transport.write_file(str(target), b"second", 0o755)
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert os.listdir(target.parent) == ["file.bin"]  # no temp file left behind
    transport.write_file(str(tmp_path / "empty"), b"")
    assert transport.read_file(str(tmp_path / "empty")) == b""
    assert transport.read_file(str(tmp_path / "missing")) is None
    assert transport.read_file(str(tmp_path / "no" / "such" / "dir")) is None


def build_tree(root: Path) -> None:
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "data.bin").write_bytes(os.urandom(300_000))
    (root / "a" / "secret").write_text("s")
    (root / "a" / "secret").chmod(0o600)
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "empty").mkdir()
    (root / "link").symlink_to("a/b/c/data.bin")
    (root / "dirlink").symlink_to("a/b")
    (root / "dangling").symlink_to("nowhere")
    for i in range(40):
        (root / "a" / f"f{i:02}.txt").write_text(f"file {i}\n" * i)


def snapshot(root: Path) -> dict[str, tuple[str, Any, int]]:
    """Every entry under ``root``: kind, content or link target, mode bits."""
    entries: dict[str, tuple[str, Any, int]] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            entries[rel] = ("link", os.readlink(path), 0)
        elif stat.S_ISDIR(info.st_mode):
            entries[rel] = ("dir", None, stat.S_IMODE(info.st_mode))
        else:
            entries[rel] = ("file", path.read_bytes(), stat.S_IMODE(info.st_mode))
    return entries


@pytest.mark.ssh
def test_tree_round_trip(transport: SSHTransport, tmp_path: Path) -> None:
    local = tmp_path / "local"
    build_tree(local)
    remote = tmp_path / "remote" / "job"
    remote.mkdir(parents=True)
    (remote / "kept.txt").write_text("already there")
    (remote / "run.sh").write_text("old")
    transport.put_tree(local, str(remote))
    expected = snapshot(local)
    got = snapshot(remote)
    assert got.pop("kept.txt") == ("file", b"already there", 0o644)
    assert got == expected
    assert (remote / "dirlink").is_symlink() and (remote / "empty").is_dir()

    transport.put_tree(local, str(remote))  # again, over itself: merged, still identical
    got = snapshot(remote)
    got.pop("kept.txt")
    assert got == expected

    back = tmp_path / "back"
    back.mkdir()
    (back / "mine").write_text("local only")
    transport.get_tree(str(remote), back)
    got = snapshot(back)
    assert got.pop("mine") == ("file", b"local only", 0o644)
    assert got.pop("kept.txt")[1] == b"already there"
    assert got == expected

    with pytest.raises(FileNotFoundError):
        transport.get_tree(str(tmp_path / "nothing"), tmp_path / "x")


@pytest.mark.ssh
def test_remove_tree(transport: SSHTransport, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    build_tree(victim)
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "keep").write_text("k")
    (victim / "out").symlink_to(outside)
    transport.remove_tree(str(victim))
    assert not victim.exists() and not victim.is_symlink()
    assert (outside / "sub" / "keep").read_text() == "k"  # links are not followed
    transport.remove_tree(str(victim))  # missing is fine
    link = tmp_path / "alias"
    link.symlink_to(outside)
    transport.remove_tree(str(link))
    assert not link.is_symlink() and (outside / "sub" / "keep").exists()


# -- failures and reconnection


@pytest.mark.ssh
def test_dropped_connection_reconnects_once(sshd_server: Any, transport: SSHTransport,
                                            ssh_log: io.StringIO, tmp_path: Path) -> None:
    assert transport.run(["echo", "1"]).stdout == "1\n"
    transport.write_file(str(tmp_path / "f"), b"before")
    assert drop_server_side(sshd_server.port) >= 1
    try:  # the drop may or may not have been noticed yet
        assert transport.run(["echo", "2"]).stdout == "2\n"
    except TransportError as exc:
        assert "connection" in str(exc)
    assert transport.run(["echo", "3"]).stdout == "3\n"
    assert transport.read_file(str(tmp_path / "f")) == b"before"  # SFTP reopened too
    transport.write_file(str(tmp_path / "f"), b"after")
    assert (tmp_path / "f").read_bytes() == b"after"
    assert transport.connections_opened == 2
    assert_one_outage(ssh_log.getvalue())


@pytest.mark.ssh
def test_sftp_session_reopened_after_it_dies(sshd_server: Any, transport: SSHTransport,
                                             tmp_path: Path) -> None:
    transport.write_file(str(tmp_path / "f"), b"one")
    servers = [child for session in server_sessions(sshd_server.port)
               for child in session.children(recursive=True) if "sftp" in child.name()]
    assert servers
    for process in servers:
        process.kill()
    psutil.wait_procs(servers, timeout=3)
    with contextlib.suppress(TransportError):  # the first call may use the dead session
        transport.read_file(str(tmp_path / "f"))
    assert transport.read_file(str(tmp_path / "f")) == b"one"
    assert transport.run(["true"]).ok
    assert transport.connections_opened == 1  # the connection itself stayed up


@pytest.mark.ssh
def test_drop_during_a_command_fails_fast(sshd_server: Any, transport: SSHTransport) -> None:
    transport.run(["true"])
    outcome: list[BaseException | str] = []

    def slow() -> None:
        try:
            outcome.append(transport.run(["sleep", "20"], timeout=30).stdout)
        except TransportError as exc:
            outcome.append(exc)

    runner = threading.Thread(target=slow)
    runner.start()
    time.sleep(0.5)
    started = time.monotonic()
    drop_server_side(sshd_server.port)
    runner.join(10)
    assert not runner.is_alive()
    assert time.monotonic() - started < 5
    assert isinstance(outcome[0], TransportError) and "lost" in str(outcome[0])
    assert transport.run(["echo", "ok"]).stdout == "ok\n"


@pytest.mark.ssh
def test_server_restart_mid_use(sshd_server: Any, transport: SSHTransport) -> None:
    assert transport.run(["echo", "before"]).ok
    sshd_server.restart()
    failures = 0
    deadline = time.monotonic() + 10
    while True:
        try:
            assert transport.run(["echo", "after"]).stdout == "after\n"
            break
        except TransportError:
            failures += 1
            assert time.monotonic() < deadline
            time.sleep(0.5)
    assert failures <= 3
    assert transport.run(["echo", "again"]).ok
    assert transport.connections_opened <= 2


@pytest.mark.ssh
def test_server_down_backoff_and_recovery(sshd_server: Any, transport: SSHTransport,
                                          ssh_log: io.StringIO) -> None:
    transport.run(["true"])
    sshd_server.stop()
    try:
        drop_server_side(sshd_server.port)
        started = time.monotonic()
        with pytest.raises(TransportError) as first:
            while True:  # the drop may be noticed by the first call or only by the next
                transport.run(["true"])
                assert time.monotonic() - started < 5
        message = str(first.value)
        assert "conn" in message.lower()
        while transport.connect_attempts < 2:  # until a real attempt has failed
            with pytest.raises(TransportError) as refused:
                transport.run(["true"])
            message = str(refused.value)
        assert f"{sshd_server.host}:{sshd_server.port}" in message
        assert "refused" in message.lower(), message
        assert time.monotonic() - started < 5
        attempts = transport.connect_attempts
        quick = time.monotonic()
        with pytest.raises(TransportError, match=r"next attempt in \d"):
            transport.run(["true"])
        assert time.monotonic() - quick < 0.5
        assert transport.connect_attempts == attempts  # no new attempt inside the backoff
        time.sleep(1.1)
        with pytest.raises(TransportError):
            transport.run(["true"])
        assert transport.connect_attempts == attempts + 1  # backoff over: tried again
    finally:
        sshd_server.start()
    deadline = time.monotonic() + 10  # the backoff is now 2 s
    while True:
        try:
            transport.run(["true"])
            break
        except TransportError:
            assert time.monotonic() < deadline
            time.sleep(0.25)
    assert transport.connect_attempts <= attempts + 2
    assert_one_outage(ssh_log.getvalue())


@pytest.mark.ssh
def test_bad_keys_fail_clearly(sshd_server: Any, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger_key"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(stranger))
    with make(sshd_server, key_path=str(stranger), log=io.StringIO()) as transport, \
            pytest.raises(TransportError, match="authentication failed"):
        transport.run(["true"])
    missing = tmp_path / "no_such_key"
    with make(sshd_server, key_path=str(missing), log=io.StringIO()) as transport, \
            pytest.raises(TransportError, match=re.escape(f"cannot load SSH key {missing}")):
        transport.run(["true"])


@pytest.mark.ssh
def test_host_key_checking(sshd_server: Any, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with make(sshd_server, options={"UserKnownHostsFile": str(empty)},
              log=io.StringIO()) as transport, \
            pytest.raises(TransportError, match="host key not trusted"):
        transport.run(["true"])
    with make(sshd_server, options={"UserKnownHostsFile": str(empty),
                                    "StrictHostKeyChecking": "no"}) as transport:
        assert transport.run(["true"]).ok


@pytest.mark.ssh
def test_default_user_is_the_local_user(sshd_server: Any) -> None:
    with SSHTransport(sshd_server.host, port=sshd_server.port,
                      key_path=str(sshd_server.key_path),
                      options={"UserKnownHostsFile": str(sshd_server.known_hosts),
                               "IdentitiesOnly": "yes"}) as transport:
        assert transport.description == f"ssh {sshd_server.host}:{sshd_server.port}"
        assert transport.run(["id", "-un"]).stdout.strip() == sshd_server.user


@pytest.mark.ssh
def test_close_is_idempotent(sshd_server: Any) -> None:
    transport = make(sshd_server)
    assert transport.run(["true"]).ok
    before = our_connections(sshd_server.port)
    thread = transport._thread
    outcome: list[BaseException] = []

    def slow() -> None:
        try:
            transport.run(["sleep", "4"], timeout=30)
        except TransportError as exc:
            outcome.append(exc)

    runner = threading.Thread(target=slow)
    runner.start()
    time.sleep(0.5)
    started = time.monotonic()
    transport.close()
    transport.close()
    runner.join(10)
    assert time.monotonic() - started < 3  # a call in flight ends with the transport
    assert len(outcome) == 1 and "closed" in str(outcome[0])
    assert thread is not None and not thread.is_alive()
    assert our_connections(sshd_server.port) == before - 1
    with pytest.raises(TransportError, match="closed"):
        transport.run(["true"])
