"""The HTTP server's side of the command line: ``serve``, ``users`` and ``upload``.

Registered on :func:`jobcell.cli.main`. FastAPI and uvicorn are imported only when
``serve`` runs, so the other commands keep their fast start.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO, Any

import click

from jobcell.cli import _out, common, open_cell, print_error, print_json
from jobcell.errors import JobcellError, SpecError

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
WORKER_START_TIMEOUT_S = 120.0      # for each process of serve --workers N to serve
UPLOAD_CHUNK = 1024 * 1024


class ServeError(JobcellError):
    """The server cannot listen where it was asked to, or did not start."""


class _Stopped(Exception):
    """SIGTERM arrived: stop like Ctrl-C does (the server shuts down, exit 0)."""


def _iso(timestamp: float | None) -> str | None:
    from jobcell.service import iso

    return iso(timestamp)


# -- serve ------------------------------------------------------------------------------
def _bind_problem(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (f"port {port} on {host} is already in use (another server is listening "
                "there); choose another with --port, or --port 0 for any free port")
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {host}: it is not an address of this machine"
    if exc.errno == errno.EACCES:
        return (f"no permission to listen on port {port} of {host} (ports below 1024 need "
                "privileges; put a reverse proxy in front and use a high port)")
    return f"cannot listen on {host} port {port}: {exc.strerror or exc}"


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (0: any free port), or a clear error.

    Binding here, before uvicorn starts, turns a busy port or an unknown host into one
    sentence instead of a server log, and gives ``--port 0`` its real port to print.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise ServeError(f"cannot listen on host {host!r}: {reason} (give an address or a "
                         "name of this machine with --host)") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ServeError(_bind_problem(host, port, exc)) from None
    return sock


def is_loopback(sock: socket.socket) -> bool:
    """Whether the socket listens on a loopback address only."""
    try:
        return ipaddress.ip_address(str(sock.getsockname()[0]).split("%")[0]).is_loopback
    except ValueError:
        return False


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}"


def _check_root_path(root_path: str) -> str:
    if root_path and (not root_path.startswith("/") or root_path.endswith("/")
                      or any(c in root_path for c in "?#\\ ")):
        raise SpecError(f"--root-path {root_path!r} must be a URL path that starts with '/' "
                        "and does not end with one (e.g. /jobcell)")
    return root_path



@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    """While serving, SIGTERM ends the command like Ctrl-C (clean shutdown, exit 0).

    uvicorn catches SIGINT and SIGTERM itself, shuts down, then raises the signal again
    with the handler that was there before: this one (or the CLI's Ctrl-C handler).
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Stopped

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _make_server(config: Any, on_ready: Callable[[], None]) -> Any:
    """A uvicorn server that calls ``on_ready`` once it accepts connections."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                on_ready()

    return Server(config)


def _log_config() -> dict[str, Any]:
    """uvicorn's logging, with the request log on stderr too: stdout carries only what
    jobcell prints (the line saying where it listens, JSON with --json)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    return config


def _announce(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(info) + "\n")
    else:
        worker = ("no worker (--no-worker)" if info["worker_pid"] is None
                  else f"worker pid {info['worker_pid']}")
        if info.get("workers", 1) > 1:
            worker = f"{info['workers']} server processes; {worker}"
        sys.stdout.write(
            f"jobcell: serving the cell {info['home']} on {info['url']} (REST API "
            f"{info['url']}/api/v1, OGC API - Processes {info['url']}/, dashboard "
            f"{info['url']}/ui, OpenAPI {info['url']}/docs); {worker}; Ctrl-C stops\n")
    sys.stdout.flush()


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Keep the loopback default and put a reverse proxy "
                   "with TLS in front for other machines.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="TCP port (0: any free port; the real one is printed).")
@click.option("--no-worker", is_flag=True,
              help="Neither start nor join the cell's worker (nor start one on submit): "
                   "jobs wait until a worker runs.")
@click.option("--proxy-headers/--no-proxy-headers", default=False, show_default=True,
              help="Trust X-Forwarded-Proto and X-Forwarded-For from --forwarded-allow-ips "
                   "(turn on behind a reverse proxy).")
@click.option("--forwarded-allow-ips", default=None, metavar="IPS",
              help="With --proxy-headers: comma-separated proxy addresses (or networks) "
                   "whose forwarded headers are trusted; '*' trusts all. "
                   "[default: 127.0.0.1]")
@click.option("--root-path", default="", metavar="PATH",
              help="The path prefix the reverse proxy serves jobcell under (e.g. /jobcell), "
                   "when the proxy strips it.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True,
              help="Server log level (info logs each request; warning does not).")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Server processes sharing the port (one Python process runs on one core "
                   "at a time); they share the cell and its one job worker.")
@common
def serve(host: str, port: int, no_worker: bool, proxy_headers: bool,
          forwarded_allow_ips: str | None, root_path: str, log_level: str, workers: int,
          home: Path | None, as_json: bool) -> None:
    """Serve the cell over HTTP: REST API, OGC API - Processes and the dashboard.

    Starts (or joins) the cell's worker unless --no-worker. Ctrl-C or SIGTERM stops the
    server; the worker and running jobs go on.
    """
    if not host.strip():
        raise SpecError("--host must not be empty")
    if forwarded_allow_ips is not None and not proxy_headers:
        raise SpecError("--forwarded-allow-ips has no effect without --proxy-headers")
    _check_root_path(root_path)
    with open_cell(home, auto_worker=not no_worker) as cell, _sigterm_stops():
        sock = bind_socket(host, port)
        try:
            _serve(cell, sock, host, no_worker=no_worker, proxy_headers=proxy_headers,
                   forwarded_allow_ips=forwarded_allow_ips or "127.0.0.1",
                   root_path=root_path, log_level=log_level, as_json=as_json,
                   workers=workers)
        except (KeyboardInterrupt, _Stopped):
            pass  # uvicorn has shut down; this is the signal it raised again afterwards
        finally:
            sock.close()
    if not as_json:
        sys.stderr.write("jobcell: server stopped\n")


def _serve(cell: Any, sock: socket.socket, host: str, *, no_worker: bool,
           proxy_headers: bool, forwarded_allow_ips: str, root_path: str, log_level: str,
           as_json: bool, workers: int = 1) -> None:
    import uvicorn

    from jobcell.server.app import create_app

    if not is_loopback(sock):
        print_error(f"warning: listening on {host}, which is not a loopback address: bearer "
                    "tokens and signed URLs cross the network in clear text. Serve TLS from a "
                    "reverse proxy in front (see the README, production deployment) and keep "
                    "jobcell on 127.0.0.1.")
    worker_pid = None if no_worker else cell.ensure_worker()["pid"]
    options: dict[str, Any] = {
        "proxy_headers": proxy_headers, "forwarded_allow_ips": forwarded_allow_ips,
        "root_path": root_path, "log_level": log_level, "log_config": _log_config(),
        "lifespan": "on", "server_header": False, "timeout_graceful_shutdown": 10}
    port = int(sock.getsockname()[1])
    info = {"url": _url(host, port), "host": host, "port": port, "root_path": root_path,
            "home": str(cell.home.root), "worker_pid": worker_pid, "workers": workers}
    if workers > 1:
        _serve_processes(cell, sock, workers, no_worker=no_worker, options=options,
                         on_ready=lambda: _announce(info, as_json))
        return
    app = create_app(cell=cell, start_worker=False)
    config = uvicorn.Config(app, **options)
    server = _make_server(config, lambda: _announce(info, as_json))
    try:
        server.run(sockets=[sock])
    except SystemExit:
        if not server.started:   # the app's startup failed; uvicorn logged why
            raise ServeError("the server did not start (see the log above)") from None
        raise
    if not server.started:
        raise ServeError("the server did not start (see the log above)")


def _serve_processes(cell: Any, sock: socket.socket, workers: int, *, no_worker: bool,
                     options: dict[str, Any], on_ready: Callable[[], None]) -> None:
    """``--workers N``: N uvicorn processes accept on the one socket bound here.

    Each process builds its own app and cell with :func:`create_app_from_env` (uvicorn
    starts them with ``spawn``, so they learn the cell from the environment). This process
    only supervises: it announces the server once every process serves, restarts one that
    dies, and on SIGINT/SIGTERM stops them all. The job worker was started (or joined)
    above; the processes never start another, except as a submit's auto-start, which
    the cell's worker-start lock keeps to one.
    """
    import os

    import uvicorn
    from uvicorn.supervisors import Multiprocess
    from uvicorn.supervisors.multiprocess import SIGNALS

    from jobcell.server.app import SERVE_AUTO_WORKER_ENV, SERVE_HOME_ENV, SERVE_PARENT_ENV

    os.environ[SERVE_HOME_ENV] = str(cell.home.root)
    os.environ[SERVE_AUTO_WORKER_ENV] = "0" if no_worker else "1"
    os.environ[SERVE_PARENT_ENV] = str(os.getpid())
    config = uvicorn.Config("jobcell.server.app:create_app_from_env", factory=True,
                            workers=workers, **options)
    failed: list[bool] = []

    class Supervisor(Multiprocess):
        def init_processes(self) -> None:
            super().init_processes()
            deadline = time.monotonic() + WORKER_START_TIMEOUT_S
            for process in self.processes:
                # Wait in slices, handling signals: Ctrl-C or SIGTERM while the processes
                # start is a clean stop, not a failed start.
                while not process.wait_until_ready(1.0, self.should_exit):
                    self.handle_signals()
                    if self.should_exit.is_set():
                        return
                    if not process.process.is_alive() or time.monotonic() > deadline:
                        time.sleep(0.2)           # a signal that killed it reaches us too
                        self.handle_signals()
                        if not self.should_exit.is_set():
                            failed.append(True)
                            self.should_exit.set()
                        return
            on_ready()

    handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}   # the supervisor takes them
    supervisor = Supervisor(config, sockets=[sock])
    try:
        supervisor.run()
    finally:
        _stop_processes(supervisor)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if failed:
        raise ServeError("the server did not start (see the log above)")


def _stop_processes(supervisor: Any, grace_s: float = 15.0) -> None:
    """Stop every server process (also when the supervisor itself failed): SIGTERM, then
    SIGKILL for what is still there after ``grace_s``."""
    deadline = time.monotonic() + grace_s
    for process in supervisor.processes:
        with contextlib.suppress(Exception):
            if process.process.exitcode is None:
                process.terminate()
    for process in supervisor.processes:
        process.process.join(max(0.0, deadline - time.monotonic()))
        if process.process.exitcode is None:
            with contextlib.suppress(Exception):
                process.process.kill()
                process.process.join(5)


# -- users ------------------------------------------------------------------------------
@click.group()
def users() -> None:
    """Add, list and revoke the HTTP API's users and their bearer tokens."""


@users.command(name="add")
@click.argument("name")
@common
def users_add(name: str, home: Path | None, as_json: bool) -> None:
    """Add user NAME and print their bearer token (shown only this once)."""
    with open_cell(home, auto_worker=False) as cell:
        user = cell.add_user(name)
    answer = {**user, "created_at": _iso(user["created_at"])}
    if as_json:
        print_json(answer)
        return
    click.echo(f"added user {answer['name']}. Their bearer token is below; it will not be "
               "shown again (only its hash is stored), so hand it over now:")
    click.echo(answer["token"])


@users.command(name="list")
@common
def users_list(home: Path | None, as_json: bool) -> None:
    """List the users with when they were added and revoked (never a token)."""
    with open_cell(home, auto_worker=False) as cell:
        rows = [{**u, "created_at": _iso(u["created_at"]), "revoked_at": _iso(u["revoked_at"])}
                for u in cell.users()]
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo("no users yet (add one with 'jobcell users add NAME')")
        return
    _out().table(None, ["user", "active", "added", "revoked"],
                 [[u["name"], "yes" if u["active"] else "no", u["created_at"],
                   u["revoked_at"] or "-"] for u in rows])


@users.command(name="revoke")
@click.argument("name")
@common
def users_revoke(name: str, home: Path | None, as_json: bool) -> None:
    """Revoke NAME's token at once (their jobs stay theirs)."""
    with open_cell(home, auto_worker=False) as cell:
        answer = cell.revoke_user(name)
    if as_json:
        print_json(answer)
    elif answer["revoked"]:
        click.echo(f"revoked user {name}: their token no longer works (their jobs stay)")
    else:
        click.echo(f"user {name} was already revoked")


# -- upload -----------------------------------------------------------------------------
def _chunks(handle: IO[bytes]) -> Iterator[bytes]:
    while chunk := handle.read(UPLOAD_CHUNK):
        yield chunk


def _open_upload(file: str) -> IO[bytes]:
    if file == "-":
        return sys.stdin.buffer
    path = Path(file)
    try:
        if path.is_dir():
            raise SpecError(f"{file!r} is a directory; upload files one at a time")
        return path.open("rb")
    except FileNotFoundError:
        raise SpecError(f"file {file!r} does not exist") from None
    except OSError as exc:
        raise SpecError(f"file {file!r} cannot be read: {exc.strerror or exc}") from None


@click.command()
@click.argument("file")
@click.option("--owner", help="Upload for this owner (default: the OS user); a job may name "
                              "only its own owner's uploads.")
@common
def upload(file: str, owner: str | None, home: Path | None, as_json: bool) -> None:
    """Store FILE (or - for stdin) in the cell by content; print the digest a job step
    names in its `files`."""
    handle = _open_upload(file)
    try:
        with open_cell(home, auto_worker=False) as cell:
            stored = cell.upload(_chunks(handle), owner=owner)
            owner = owner or _default_owner()
    except OSError as exc:
        raise SpecError(f"cannot upload {file!r}: {exc.strerror or exc}") from None
    finally:
        if handle is not sys.stdin.buffer:
            handle.close()
    name = "stdin" if file == "-" else Path(file).name
    answer = {**stored, "owner": owner, "file": file}
    if as_json:
        print_json(answer)
        return
    click.echo(f"uploaded {file} ({stored['size']:,} bytes) for owner {owner}; BLAKE3 "
               f"{stored['digest']}")
    click.echo(f"name it in a step of a job by {owner}:  files: {{{json.dumps(name)}: "
               f"{stored['digest']}}}")


def _default_owner() -> str:
    from jobcell.service import default_owner

    return default_owner()
