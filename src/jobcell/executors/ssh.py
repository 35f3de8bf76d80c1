"""The SSH transport: commands and files on a login node over one multiplexed connection.

One :class:`SSHTransport` holds ONE SSH connection (asyncssh) to its host, opened on first
use and shared by every command and file transfer (each command is its own channel; all
file transfers share one SFTP session). The transport is called from synchronous code, so
it owns an asyncio event loop running in a daemon thread; every public method submits a
coroutine to that loop and waits for it with a deadline, so several threads may use one
transport at the same time.

Remote commands are ``shlex.join(argv)`` (``env K=V ... argv`` when ``env`` is given):
no value is ever interpolated into shell text. When the connection drops, the call that
notices raises :class:`TransportError`; the next call reconnects, with exponential backoff
between failed attempts (1 s doubling to 30 s, reset on success) so that a dead host is not
hammered. Outages are logged once: "connection to X lost" then "connection to X restored".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import posixpath
import re
import secrets
import shlex
import signal
import stat
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO, TypeVar

import asyncssh

from jobcell.executors.transport import CommandResult, TransportError

T = TypeVar("T")

BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 30.0
DEFAULT_KEEPALIVE_S = 30.0
DEFAULT_MAX_SESSIONS = 10  # OpenSSH's MaxSessions default: channels open at once per connection
_TRANSFER_CONCURRENCY = 16
_CLOSE_TIMEOUT_S = 5.0
_SLACK_S = 10.0  # added to a call's own deadlines before the caller gives up on the loop

_DEFAULT_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2",
                        "/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
_SESSION_REFUSED = (asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, asyncssh.OPEN_CONNECT_FAILED,
                    asyncssh.OPEN_RESOURCE_SHORTAGE)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# OpenSSH option names (case-insensitive, like ssh_config) this transport understands.
_OPTION_NAMES = ("StrictHostKeyChecking", "UserKnownHostsFile", "GlobalKnownHostsFile",
                 "HostKeyAlias", "ServerAliveInterval", "ServerAliveCountMax", "TCPKeepAlive",
                 "ConnectTimeout", "Compression", "IdentityFile", "IdentitiesOnly",
                 "ProxyJump", "ProxyCommand", "Ciphers", "MACs", "KexAlgorithms",
                 "HostKeyAlgorithms", "PubkeyAuthentication", "PasswordAuthentication",
                 "KbdInteractiveAuthentication", "GSSAPIAuthentication", "BatchMode",
                 "LogLevel")
_KNOWN_OPTIONS = {name.lower(): name for name in _OPTION_NAMES}
_OWN_ARGUMENTS = {"user": "user (slurm_login_user)", "port": "port (slurm_login_port)",
                  "hostname": "host (slurm_login_host)"}


def _yes_no(name: str, value: str) -> bool:
    text = value.strip().lower()
    if text in ("yes", "true", "on"):
        return True
    if text in ("no", "false", "off"):
        return False
    raise ValueError(f"SSH option {name}={value!r}: expected yes or no")


def _seconds(name: str, value: str, minimum: float) -> float:
    try:
        number = float(value.strip().rstrip("sS"))
    except ValueError:
        raise ValueError(f"SSH option {name}={value!r}: expected a number of seconds") from None
    if not minimum <= number < float("inf"):
        raise ValueError(f"SSH option {name}={value!r}: must be at least {minimum:g}")
    return number


def _paths(value: str) -> list[str]:
    return [os.path.expanduser(part) for part in value.split()]


def _algorithms(name: str, value: str) -> list[str]:
    names = [part.strip() for part in value.split(",") if part.strip()]
    if not names or any(n[0] in "+-^" for n in names):
        raise ValueError(f"SSH option {name}={value!r}: expected a plain comma-separated "
                         "list of algorithms (+, - and ^ prefixes are not supported)")
    return names


class _Settings:
    """The asyncssh connect arguments an OpenSSH-style option table stands for."""

    def __init__(self, options: Mapping[str, str], connect_timeout: float,
                 key_path: str | None) -> None:
        self.check_host_key = True
        self.known_hosts: list[str] | None = None  # None: OpenSSH's default files
        self.global_known_hosts: list[str] | None = None
        self.connect_timeout = connect_timeout
        self.key_files: list[str] = [os.path.expanduser(key_path)] if key_path else []
        self.use_agent = not key_path  # an explicit key means exactly that key
        self.kwargs: dict[str, Any] = {"keepalive_interval": DEFAULT_KEEPALIVE_S,
                                       "keepalive_count_max": 3}
        for raw_name, raw_value in options.items():
            self._apply(raw_name, raw_value)

    def _apply(self, raw_name: str, raw_value: str) -> None:
        key = str(raw_name).strip().lower()
        if key in _OWN_ARGUMENTS:
            raise ValueError(f"SSH option {raw_name!r} is not accepted in the options: "
                             f"set it with the transport's {_OWN_ARGUMENTS[key]}")
        if key not in _KNOWN_OPTIONS:
            raise ValueError(f"unknown SSH option {raw_name!r} (supported: "
                             f"{', '.join(_OPTION_NAMES)})")
        name = _KNOWN_OPTIONS[key]
        if not isinstance(raw_value, str):
            raise ValueError(f"SSH option {name}: value must be a string, got {raw_value!r}")
        value = raw_value.strip()
        if name == "StrictHostKeyChecking":
            text = value.lower()
            if text == "accept-new":
                raise ValueError("SSH option StrictHostKeyChecking=accept-new is not "
                                 "supported: list the host key in a known_hosts file "
                                 "(UserKnownHostsFile) or use 'no'")
            if text not in ("yes", "no", "ask", "off", "on", "true", "false"):
                raise ValueError(f"SSH option StrictHostKeyChecking={value!r}: expected "
                                 "yes or no")
            self.check_host_key = text in ("yes", "ask", "on", "true")
        elif name == "UserKnownHostsFile":
            self.known_hosts = _paths(value) if value.lower() != "none" else []
        elif name == "GlobalKnownHostsFile":
            self.global_known_hosts = _paths(value) if value.lower() != "none" else []
        elif name == "HostKeyAlias":
            self.kwargs["host_key_alias"] = value
        elif name == "ServerAliveInterval":
            self.kwargs["keepalive_interval"] = _seconds(name, value, 0.0)
        elif name == "ServerAliveCountMax":
            count = _seconds(name, value, 1.0)
            if not count.is_integer():
                raise ValueError(f"SSH option {name}={value!r}: expected a whole number")
            self.kwargs["keepalive_count_max"] = int(count)
        elif name == "TCPKeepAlive":
            self.kwargs["tcp_keepalive"] = _yes_no(name, value)
        elif name == "ConnectTimeout":
            self.connect_timeout = _seconds(name, value, 0.001)
        elif name == "Compression":
            self.kwargs["compression_algs"] = (["zlib@openssh.com", "zlib", "none"]
                                               if _yes_no(name, value) else None)
        elif name == "IdentityFile":
            self.key_files.extend(_paths(value))
        elif name == "IdentitiesOnly":
            if _yes_no(name, value):
                self.use_agent = False
        elif name == "ProxyJump":
            if value.lower() != "none":
                self.kwargs["tunnel"] = value
        elif name == "ProxyCommand":
            if value.lower() != "none":
                self.kwargs["proxy_command"] = value
        elif name in ("Ciphers", "MACs", "KexAlgorithms", "HostKeyAlgorithms"):
            target = {"Ciphers": "encryption_algs", "MACs": "mac_algs",
                      "KexAlgorithms": "kex_algs",
                      "HostKeyAlgorithms": "server_host_key_algs"}[name]
            self.kwargs[target] = _algorithms(name, value)
        elif name == "PubkeyAuthentication":
            self.kwargs["public_key_auth"] = _yes_no(name, value)
        elif name == "PasswordAuthentication":
            self.kwargs["password_auth"] = _yes_no(name, value)
        elif name == "KbdInteractiveAuthentication":
            self.kwargs["kbdint_auth"] = _yes_no(name, value)
        elif name == "GSSAPIAuthentication":
            enabled = _yes_no(name, value)
            self.kwargs["gss_auth"] = enabled
            self.kwargs["gss_kex"] = enabled
        elif name == "BatchMode":
            _yes_no(name, value)  # always batch: nothing ever prompts
        elif name == "LogLevel":
            pass  # asyncssh logs through the ``logging`` module instead

    def known_hosts_files(self) -> list[str]:
        if self.known_hosts is None and self.global_known_hosts is None:
            candidates = [os.path.expanduser(p) for p in _DEFAULT_KNOWN_HOSTS]
        else:
            candidates = [*(self.known_hosts if self.known_hosts is not None
                            else _paths(_DEFAULT_KNOWN_HOSTS[0])),
                          *(self.global_known_hosts if self.global_known_hosts is not None
                            else [_DEFAULT_KNOWN_HOSTS[2]])]
        # OpenSSH reads a missing known_hosts file as empty; asyncssh would fail on it.
        return [p for p in candidates if os.path.isfile(p) and os.access(p, os.R_OK)]


class _Client(asyncssh.SSHClient):
    """Tells the transport when its connection ends."""

    def __init__(self, on_lost: Callable[[asyncssh.SSHClientConnection, Exception | None],
                                         None]) -> None:
        self._on_lost = on_lost
        self._conn: asyncssh.SSHClientConnection | None = None

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self._conn = conn

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._on_lost(self._conn, exc)


def _reason(exc: BaseException) -> str:
    """A short human reason for a connection-level failure."""
    if isinstance(exc, asyncssh.PermissionDenied):
        return f"authentication failed ({exc.reason or 'permission denied'})"
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return f"host key not trusted ({exc.reason})"
    if isinstance(exc, asyncssh.DisconnectError):
        return exc.reason or type(exc).__name__
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timed out"
    if isinstance(exc, OSError):
        if exc.errno:  # asyncio words a refused connect "Connect call failed (addr)"
            return os.strerror(exc.errno)
        return exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, asyncssh.SFTPError):
        return exc.reason or type(exc).__name__
    return str(exc) or type(exc).__name__


def _returncode(done: asyncssh.SSHCompletedProcess) -> int | None:
    if done.exit_status is not None and done.exit_status >= 0 and not done.exit_signal:
        return done.exit_status
    if done.exit_signal:
        name = str(done.exit_signal[0]).upper()
        try:
            return 128 + int(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])
        except KeyError:
            return 255
    return None


def _sftp_os_error(exc: asyncssh.SFTPError, what: str, where: str) -> OSError:
    """A definite file-system answer from the server, as the matching OSError."""
    message = f"{where}: {what}: {exc.reason or type(exc).__name__}"
    if isinstance(exc, (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath)):
        return FileNotFoundError(message)
    if isinstance(exc, asyncssh.SFTPPermissionDenied):
        return PermissionError(message)
    if isinstance(exc, asyncssh.SFTPNotADirectory):
        return NotADirectoryError(message)
    if isinstance(exc, asyncssh.SFTPFileIsADirectory):
        return IsADirectoryError(message)
    return OSError(message)


def _missing_program(argv: Sequence[str], code: int, stdout: str, stderr: str) -> bool:
    """Whether the remote shell (or ``env``) said that ``argv[0]`` cannot be run."""
    if code not in (126, 127) or stdout.strip():
        return False
    program = re.escape(argv[0])
    return re.search(rf"(^|[\s'‘\"]){program}['’\"]?: (command not found|not found|"
                     rf"No such file or directory|Permission denied)", stderr) is not None


class SSHTransport:
    """Commands and files on one host, over one persistent multiplexed SSH connection."""

    def __init__(self, host: str, *, user: str | None = None, port: int = 22,
                 key_path: str | None = None, options: Mapping[str, str] | None = None,
                 connect_timeout: float = 15.0, log: TextIO | None = None,
                 max_sessions: int = DEFAULT_MAX_SESSIONS) -> None:
        if not host or not isinstance(host, str) or any(c.isspace() for c in host):
            raise ValueError(f"SSH host must be a host name, got {host!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"SSH port must be 1-65535, got {port!r}")
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be positive, got {connect_timeout!r}")
        if max_sessions < 2:
            raise ValueError("max_sessions must be at least 2 (one SFTP session + commands)")
        self.host = host
        self.user = user
        self.port = port
        self._settings = _Settings(options or {}, float(connect_timeout), key_path)
        self.target = f"{user + '@' if user else ''}{host}:{port}"
        self.description = f"ssh {self.target}"
        self._log = log
        self._max_commands = max_sessions - 1  # the SFTP session holds one channel
        # Thread side: the loop thread, started on first use.
        self._start_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        # Loop side: touched only by coroutines running on the loop.
        self._conn: asyncssh.SSHClientConnection | None = None
        self._sftp: asyncssh.SFTPClient | None = None
        self._sftp_conn: asyncssh.SSHClientConnection | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._sftp_lock: asyncio.Lock | None = None
        self._sessions: asyncio.Semaphore | None = None
        self._backoff = BACKOFF_INITIAL_S
        self._retry_at = 0.0
        self._last_error = ""
        self._outage = False
        self._lost_reason: str | None = None
        self._abandoned = 0  # commands given up on after their timeout
        self.connect_attempts = 0  # how many times this transport has tried to connect
        self.connections_opened = 0  # ... and how many of those attempts succeeded

    @classmethod
    def from_settings(cls, settings: Any, *, log: TextIO | None = None) -> SSHTransport:
        """The transport to ``slurm_login_host`` described by the cell settings."""
        host = getattr(settings, "slurm_login_host", None)
        if not host:
            raise ValueError("slurm_login_host is not set: no SSH login node to connect to")
        return cls(host, user=getattr(settings, "slurm_login_user", None),
                   port=int(getattr(settings, "slurm_login_port", 22) or 22),
                   key_path=getattr(settings, "slurm_ssh_key", None),
                   options=getattr(settings, "slurm_ssh_options", None) or {}, log=log)

    # -- the loop thread

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._start_lock:
            if self._closed:
                raise TransportError(f"{self.description}: transport is closed")
            if self._loop is None:
                loop = asyncio.new_event_loop()
                self._connect_lock = asyncio.Lock()
                self._sftp_lock = asyncio.Lock()
                self._sessions = asyncio.Semaphore(self._max_commands)
                thread = threading.Thread(target=self._run_loop, args=(loop,), daemon=True,
                                          name=f"jobcell-ssh-{self.host}:{self.port}")
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                tasks = asyncio.all_tasks(loop)
                for task in tasks:
                    task.cancel()  # callers still waiting get "cancelled (transport closing)"
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _call(self, coro_factory: Callable[[], Coroutine[Any, Any, T]], deadline: float,
              what: str) -> T:
        """Run a coroutine on the loop and wait for it at most ``deadline`` seconds."""
        loop = self._ensure_loop()
        coro = coro_factory()
        try:
            future = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:  # the loop closed under us: close() raced this call
            coro.close()
            raise TransportError(f"{self.description}: transport is closed") from None
        try:
            return future.result(timeout=deadline)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TransportError(f"{self.description}: {what} did not finish in "
                                 f"{deadline:g} s") from None
        except concurrent.futures.CancelledError:
            raise TransportError(f"{self.description}: {what} was cancelled "
                                 "(transport closing)") from None

    def _write_log(self, line: str) -> None:
        stream = self._log if self._log is not None else sys.stderr
        with contextlib.suppress(Exception):
            stream.write(f"jobcell: {line}\n")
            stream.flush()

    # -- the connection (loop side)

    def _on_lost(self, conn: asyncssh.SSHClientConnection, exc: Exception | None) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        if self._closed:
            return
        reason = _reason(exc) if exc is not None else "closed by the server"
        self._lost_reason = reason
        if not self._outage:
            self._outage = True
            self._write_log(f"connection to {self.target} lost: {reason}")

    async def _connection(self) -> asyncssh.SSHClientConnection:
        assert self._connect_lock is not None
        async with self._connect_lock:
            conn = self._conn
            if conn is not None and not conn.is_closed():
                return conn
            if conn is not None:  # closed without connection_lost having run yet
                self._on_lost(conn, None)
            if self._closed:
                raise TransportError(f"{self.description}: transport is closed")
            wait = self._retry_at - time.monotonic()
            if wait > 0:
                raise TransportError(
                    f"cannot connect to {self.target}: {self._last_error}; "
                    f"next attempt in {wait:.1f} s")
            self.connect_attempts += 1
            try:
                conn = await self._open()
            except TransportError as exc:
                self._retry_at = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
                self._last_error = str(exc)
                if not self._outage:
                    self._outage = True
                    state = "lost" if self.connections_opened else "unavailable"
                    self._write_log(f"connection to {self.target} {state}: {exc}")
                raise TransportError(f"cannot connect to {self.target}: {exc} "
                                     f"(next attempt in {self._retry_at - time.monotonic():.1f}"
                                     " s at the earliest)") from None
            self._backoff = BACKOFF_INITIAL_S
            self._retry_at = 0.0
            self._conn = conn
            self._abandoned = 0
            self._lost_reason = None
            self.connections_opened += 1
            if self._outage:
                self._outage = False
                self._write_log(f"connection to {self.target} restored")
            return conn

    async def _open(self) -> asyncssh.SSHClientConnection:
        """One connection attempt; TransportError (without host prefix) when it fails."""
        settings = self._settings
        keys: list[asyncssh.SSHKey] = []
        for path in settings.key_files:
            try:
                keys.append(asyncssh.read_private_key(path))
            except (OSError, asyncssh.KeyImportError, ValueError) as exc:
                detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                raise TransportError(f"cannot load SSH key {path}: {detail}") from None
        known_hosts: Any = None
        if settings.check_host_key:
            files = settings.known_hosts_files()
            known_hosts = files if files else b""
        kwargs: dict[str, Any] = dict(settings.kwargs)
        if keys:
            kwargs["client_keys"] = keys
        if not settings.use_agent:
            kwargs["agent_path"] = None
        if self.user:  # asyncssh wants the argument left out (not None) for its default
            kwargs["username"] = self.user
        try:
            conn, _ = await asyncio.wait_for(
                asyncssh.create_connection(
                    lambda: _Client(self._on_lost), self.host, self.port,
                    known_hosts=known_hosts,
                    connect_timeout=settings.connect_timeout, login_timeout=
                    settings.connect_timeout, **kwargs),
                settings.connect_timeout + 1.0)
        except (OSError, asyncssh.Error, TimeoutError, ValueError) as exc:
            reason = _reason(exc)
            if isinstance(exc, asyncssh.HostKeyNotVerifiable):
                checked = ", ".join(settings.known_hosts_files()) or "none found"
                reason += (f"; known_hosts files checked: {checked} (set UserKnownHostsFile, "
                           "or StrictHostKeyChecking=no)")
            elif isinstance(exc, TimeoutError):
                reason = f"timed out after {settings.connect_timeout:g} s"
            raise TransportError(reason) from None
        return conn

    def _failure(self, exc: BaseException, what: str) -> TransportError:
        reason = _reason(exc)
        if self._closed:
            return TransportError(f"{self.description}: {what}: transport closed")
        if self._conn is None or isinstance(exc, (asyncssh.ConnectionLost,
                                                  asyncssh.SFTPConnectionLost,
                                                  asyncssh.DisconnectError)):
            reason = f"connection lost ({self._lost_reason or reason})"
        return TransportError(f"{self.description}: {what}: {reason}")

    async def _sftp_client(self) -> asyncssh.SFTPClient:
        assert self._sftp_lock is not None
        async with self._sftp_lock:
            conn = await self._connection()
            if self._sftp is None or self._sftp_conn is not conn:
                if self._sftp is not None:
                    self._sftp.exit()
                    self._sftp = None
                delay, waited = 0.05, 0.0
                while True:
                    try:
                        self._sftp = await conn.start_sftp_client()
                        break
                    except asyncssh.ChannelOpenError as exc:
                        if conn.is_closed() or exc.code not in _SESSION_REFUSED or \
                                waited >= self._settings.connect_timeout:
                            raise self._failure(exc, "cannot start SFTP") from None
                    except (OSError, asyncssh.Error) as exc:
                        raise self._failure(exc, "cannot start SFTP") from None
                    await asyncio.sleep(delay)
                    waited += delay
                    delay = min(delay * 2, 1.0)
                self._sftp_conn = conn
            return self._sftp

    # -- commands

    def run(self, argv: Sequence[str], *, input_text: str | None = None,
            timeout: float = 60.0, env: Mapping[str, str] | None = None) -> CommandResult:
        """Run ``argv`` on the host; :class:`TransportError` when it could not be run."""
        args = [str(a) for a in argv]
        if not args:
            raise ValueError("run needs a program to run (argv is empty)")
        if any("\0" in a for a in args):
            raise ValueError("command arguments cannot contain NUL bytes")
        words = args
        if env:
            for name, value in env.items():
                if not _ENV_NAME.match(name) or "\0" in value:
                    raise ValueError(f"not a valid environment variable: {name!r}")
            if "=" in args[0]:
                raise ValueError(f"program name {args[0]!r} cannot contain '=' with env")
            words = ["env", *(f"{name}={value}" for name, value in env.items()), *args]
        command = shlex.join(words)
        result = self._call(lambda: self._run(args, command, input_text, timeout),
                            self._settings.connect_timeout + timeout + _SLACK_S,
                            f"running {args[0]}")
        if _missing_program(args, result.returncode, result.stdout, result.stderr):
            raise TransportError(f"{args[0]}: program not found or not executable on "
                                 f"{self.target} ({result.describe()})")
        return result

    async def _run(self, argv: list[str], command: str, input_text: str | None,
                   timeout: float) -> CommandResult:
        await self._connection()  # fail fast, before queueing for a session
        assert self._sessions is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            await asyncio.wait_for(self._sessions.acquire(), timeout)
        except TimeoutError:
            raise TransportError(f"{self.description}: {argv[0]} waited {timeout:g} s for a "
                                 "free SSH session") from None
        try:
            process = await self._start_process(argv, command, input_text, deadline)
            try:
                done = await process.wait(timeout=max(deadline - loop.time(), 0.001))
            except asyncssh.TimeoutError:
                process.close()  # OpenSSH ignores signal requests: the command may linger
                self._abandoned += 1
                raise TransportError(f"{self.description}: {argv[0]} did not answer in "
                                     f"{timeout:g} s") from None
            except (OSError, asyncssh.Error) as exc:
                process.close()
                raise self._failure(exc, f"running {argv[0]}") from None
        finally:
            self._sessions.release()
        code = _returncode(done)
        if code is None:  # the channel closed without an exit status: outcome unknown
            raise self._failure(ConnectionError("no exit status"), f"running {argv[0]}")
        stdout = done.stdout if isinstance(done.stdout, str) else ""
        stderr = done.stderr if isinstance(done.stderr, str) else ""
        return CommandResult(tuple(argv), code, stdout, stderr)

    async def _start_process(self, argv: list[str], command: str, input_text: str | None,
                             deadline: float) -> asyncssh.SSHClientProcess[str]:
        """Open a session channel for ``command``, waiting for a free session when the server
        refuses one (its MaxSessions is lower than ours, or abandoned commands still hold
        sessions) until ``deadline``."""
        loop = asyncio.get_running_loop()
        delay = 0.05
        while True:
            conn = await self._connection()
            try:
                if input_text:
                    return await conn.create_process(command, input=input_text,
                                                     encoding="utf-8", errors="replace")
                return await conn.create_process(command, stdin=asyncssh.DEVNULL,
                                                 encoding="utf-8", errors="replace")
            except asyncssh.ChannelOpenError as exc:
                if conn.is_closed() or exc.code not in _SESSION_REFUSED:
                    raise self._failure(exc, f"cannot start {argv[0]}") from None
                if loop.time() + delay >= deadline:
                    hint = (f"; {self._abandoned} timed-out command(s) may still hold sessions"
                            if self._abandoned else "")
                    raise TransportError(f"{self.description}: no free SSH session for "
                                         f"{argv[0]} ({exc.reason}){hint}") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except (OSError, asyncssh.Error) as exc:
                raise self._failure(exc, f"cannot start {argv[0]}") from None

    # -- files

    def _file_call(self, body: Callable[[asyncssh.SFTPClient], Awaitable[T]], what: str,
                   deadline: float) -> T:
        async def call() -> T:
            sftp = await self._sftp_client()
            try:
                return await body(sftp)
            except (OSError, TransportError):
                raise
            except (asyncssh.SFTPConnectionLost, asyncssh.SFTPNoConnection,
                    asyncssh.DisconnectError, asyncssh.ChannelOpenError) as exc:
                if self._sftp is sftp:  # the SFTP session died: open a new one next time
                    self._sftp = None
                raise self._failure(exc, what) from None
            except asyncssh.SFTPError as exc:
                if self._conn is None or self._sftp_conn is not self._conn:
                    raise self._failure(exc, what) from None
                raise _sftp_os_error(exc, what, self.description) from None
            except asyncssh.Error as exc:
                raise self._failure(exc, what) from None

        return self._call(call, deadline, what)

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write a file atomically (temp file + rename), creating its directory."""
        deadline = self._settings.connect_timeout + 60.0 + len(data) / 1_000_000

        async def body(sftp: asyncssh.SFTPClient) -> None:
            parent = posixpath.dirname(path)
            if parent:
                await _makedirs(sftp, parent, self.description)
            tmp = f"{path}.tmp-{secrets.token_hex(6)}"
            try:
                async with sftp.open(tmp, "wb") as handle:
                    await handle.write(data)
                await sftp.chmod(tmp, mode)
                await sftp.posix_rename(tmp, path)
            except BaseException:
                with contextlib.suppress(Exception):
                    await sftp.remove(tmp)
                raise

        self._file_call(body, f"writing {path}", deadline)

    def read_file(self, path: str) -> bytes | None:
        """A file's content, or None when it does not exist."""
        async def body(sftp: asyncssh.SFTPClient) -> bytes | None:
            try:
                async with sftp.open(path, "rb") as handle:
                    data = await handle.read()
            except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath,
                    asyncssh.SFTPNotADirectory):
                return None
            return data if isinstance(data, bytes) else bytes(data, "utf-8")

        return self._file_call(body, f"reading {path}", self._settings.connect_timeout + 300.0)

    def put_tree(self, local: Path, remote: str) -> None:
        """Copy a local directory tree to ``remote``, merged into what is there: files keep
        their mode bits and times, symlinks stay symlinks, empty directories are created."""
        local = Path(local)
        if not local.is_dir():
            raise NotADirectoryError(f"{local}: not a directory")
        dirs: list[tuple[str, int]] = [("", stat.S_IMODE(local.stat().st_mode))]
        files: list[tuple[str, int]] = []
        links: list[tuple[str, str]] = []
        total = 0
        for root, dirnames, filenames in os.walk(local):
            rel_root = os.path.relpath(root, local)
            for name in [*dirnames, *filenames]:
                full = os.path.join(root, name)
                rel = name if rel_root == "." else f"{rel_root}/{name}"
                info = os.lstat(full)
                if stat.S_ISLNK(info.st_mode):
                    links.append((rel, os.readlink(full)))
                elif stat.S_ISDIR(info.st_mode):
                    dirs.append((rel, stat.S_IMODE(info.st_mode)))
                elif stat.S_ISREG(info.st_mode):
                    files.append((rel, info.st_size))
                    total += info.st_size
        deadline = self._settings.connect_timeout + 120.0 + len(files) * 0.5 + total / 1_000_000

        async def body(sftp: asyncssh.SFTPClient) -> None:
            for rel, _ in dirs:  # parents first
                await _makedirs(sftp, _join(remote, rel), self.description)
            limit = asyncio.Semaphore(_TRANSFER_CONCURRENCY)

            async def put_file(rel: str) -> None:
                async with limit:
                    target = _join(remote, rel)
                    tmp = f"{target}.tmp-{secrets.token_hex(6)}"
                    try:
                        await sftp.put(str(local / rel), tmp, preserve=True)
                        await sftp.posix_rename(tmp, target)
                    except BaseException:
                        with contextlib.suppress(Exception):
                            await sftp.remove(tmp)
                        raise

            async def put_link(rel: str, pointee: str) -> None:
                async with limit:
                    target = _join(remote, rel)
                    tmp = f"{target}.tmp-{secrets.token_hex(6)}"
                    await sftp.symlink(pointee, tmp)
                    try:
                        await sftp.posix_rename(tmp, target)
                    except BaseException:
                        with contextlib.suppress(Exception):
                            await sftp.remove(tmp)
                        raise

            await _gather([put_file(rel) for rel, _ in files]
                          + [put_link(rel, pointee) for rel, pointee in links])
            for rel, mode in reversed(dirs):  # last, so read-only dirs can be filled first
                await sftp.chmod(_join(remote, rel), mode)

        self._file_call(body, f"copying {local} to {remote}", deadline)

    def get_tree(self, remote: str, local: Path) -> None:
        """Copy a remote directory tree into ``local``, merged into what is there."""
        local = Path(local)

        async def body(sftp: asyncssh.SFTPClient) -> None:
            try:
                top = await sftp.lstat(remote)
            except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath) as exc:
                raise FileNotFoundError(f"{self.description}: {remote}: no such "
                                        "directory") from exc
            if top.type != asyncssh.FILEXFER_TYPE_DIRECTORY:
                raise NotADirectoryError(f"{self.description}: {remote}: not a directory")
            dirs: list[tuple[str, int]] = [("", (top.permissions or 0o755) & 0o7777)]
            files: list[str] = []
            links: list[tuple[str, str]] = []
            pending = [""]
            while pending:
                rel_dir = pending.pop()
                async for entry in sftp.scandir(_join(remote, rel_dir)):
                    name = str(entry.filename)
                    if name in (".", "..") or "/" in name:
                        continue
                    rel = name if not rel_dir else f"{rel_dir}/{name}"
                    kind = entry.attrs.type
                    if kind == asyncssh.FILEXFER_TYPE_SYMLINK:
                        links.append((rel, str(await sftp.readlink(_join(remote, rel)))))
                    elif kind == asyncssh.FILEXFER_TYPE_DIRECTORY:
                        dirs.append((rel, (entry.attrs.permissions or 0o755) & 0o7777))
                        pending.append(rel)
                    elif kind == asyncssh.FILEXFER_TYPE_REGULAR:
                        files.append(rel)
            for rel, _ in sorted(dirs):
                target = local / rel if rel else local
                if target.is_symlink() or (target.exists() and not target.is_dir()):
                    target.unlink()
                target.mkdir(parents=True, exist_ok=True)
            limit = asyncio.Semaphore(_TRANSFER_CONCURRENCY)

            async def get_file(rel: str) -> None:
                async with limit:
                    target = local / rel
                    tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(6)}")
                    try:
                        await sftp.get(_join(remote, rel), str(tmp), preserve=True)
                        os.replace(tmp, target)
                    except BaseException:
                        with contextlib.suppress(OSError):
                            tmp.unlink()
                        raise

            await _gather([get_file(rel) for rel in files])
            for rel, pointee in links:
                target = local / rel
                tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(6)}")
                os.symlink(pointee, tmp)
                os.replace(tmp, target)
            for rel, mode in sorted(dirs, reverse=True):
                os.chmod(local / rel if rel else local, mode)

        self._file_call(body, f"copying {remote} to {local}",
                        self._settings.connect_timeout + 3600.0)

    def remove_tree(self, path: str) -> None:
        """Remove a remote directory tree (or file, or symlink); missing is fine."""
        async def body(sftp: asyncssh.SFTPClient) -> None:
            try:
                info = await sftp.lstat(path)
            except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath):
                return
            if info.type != asyncssh.FILEXFER_TYPE_DIRECTORY:
                with contextlib.suppress(asyncssh.SFTPNoSuchFile):
                    await sftp.remove(path)
                return

            def tolerate_missing(_func: object, _path: object, exc_info: Any) -> None:
                if not isinstance(exc_info[1], asyncssh.SFTPNoSuchFile):
                    raise exc_info[1]

            await sftp.rmtree(path, onerror=tolerate_missing)

        self._file_call(body, f"removing {path}", self._settings.connect_timeout + 600.0)

    # -- lifetime

    def close(self) -> None:
        """Close the connection and stop the loop thread; safe to call twice."""
        with self._start_lock:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if self._sftp is not None:
                self._sftp.exit()
                self._sftp = None
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.wait_closed(), _CLOSE_TIMEOUT_S)

        if thread is not threading.current_thread():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(shutdown(), loop).result(
                    _CLOSE_TIMEOUT_S + 1.0)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(_CLOSE_TIMEOUT_S)

    def __enter__(self) -> SSHTransport:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SSHTransport {self.target}>"


def _join(base: str, rel: str) -> str:
    return posixpath.join(base, rel) if rel else base


async def _gather(tasks: list[Coroutine[Any, Any, None]]) -> None:
    """Run transfers together; the first error wins once all have stopped."""
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def _makedirs(sftp: asyncssh.SFTPClient, path: str, where: str) -> None:
    """``mkdir -p``: one round trip when the directory is already there."""
    try:
        if await sftp.isdir(path):
            return
        await sftp.makedirs(path, exist_ok=True)
    except asyncssh.SFTPFailure as exc:  # e.g. a file in the way
        if not await sftp.isdir(path):
            raise NotADirectoryError(f"{where}: {path}: cannot create directory "
                                     f"({exc.reason})") from None
