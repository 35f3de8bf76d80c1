"""The Slurm task client backend: a local cell whose executor is Slurm over SSH.

``SlurmBackend(login_host, slurm_tmp_io, ...)`` is a :class:`LocalBackend` on a cell
home of its own (default ``<user data dir>/jobcell/slurm-[user@]host[-port]``, so it
never reconfigures the user's main cell) whose worker submits every step with
``sbatch`` on the login node, through one multiplexed SSH connection (asyncssh), and
stages files through ``slurm_tmp_io``. Submitting, polling, results, files and
provisioning (``vcpu``, ``memory``, ``gpu``, ``timeout`` become the step's resources,
hence ``--cpus-per-task``, ``--mem``, ``--gres``, ``--time``) are the local backend's.

Where the options live. The cell's worker is a separate daemon process
(``python -m jobcell.worker --home H``) that reads ``<home>/jobcell.toml`` (and
``JOBCELL_<NAME>`` variables), never the submitting process's memory. So the backend
writes the options it owns into that file, atomically, under a lock, and records what
it wrote in ``<home>/slurm-backend.json``. It only replaces values it wrote itself; a
value someone else put in the file that differs is refused with a :class:`ConfigError`
(remove it or pass the same value), and so is an environment variable that would
override one of its options in the worker, and an existing cell it did not set up
whose executor is not ``slurm`` (it never turns a user's cell into a Slurm one).
When the file changed and a worker is alive, that worker is stopped: the next submit
or poll starts one with the new options (Slurm jobs go on; the new worker adopts them
from their records). Comments in a rewritten file are not kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import posixpath
import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobcell.client.backends import LocalBackend
from jobcell.errors import ConfigError, WorkerError

if TYPE_CHECKING:
    from jobcell.home import CellHome
    from jobcell.service import Cell

logger = logging.getLogger("jobcell.client")

STATE_FILE = "slurm-backend.json"
LOCK_FILE = "slurm-backend.lock"

# The cell options the constructor's arguments set: ``settings`` may not name them.
OWNED_OPTIONS: dict[str, str] = {
    "executor_backend": "(always 'slurm')",
    "slurm_login_host": "login_host",
    "slurm_login_user": "login_user (or '-l' in ssh_extra)",
    "slurm_login_port": "login_port (or '-p' in ssh_extra)",
    "slurm_ssh_key": "ssh_key (or '-i' in ssh_extra)",
    "slurm_ssh_options": "ssh_extra ('-o Name=Value')",
    "slurm_tmp_io": "slurm_tmp_io",
    "slurm_tmp_io_local": "slurm_tmp_io_local",
    "sbatch_extra": "sbatch_extra",
    "slurm_script_shell": "slurm_script_shell",
    "preparation_script_before": "preparation_script_before",
    "preparation_script_after": "preparation_script_after",
    "debug_slurm_script": "debug_slurm_script",
    "slurm_partition": "partition",
}

# ssh(1) flags without a value that mean nothing to the asyncssh transport (it never
# allocates a TTY, forwards X11 or the agent, or reads stdin): accepted and ignored.
_NO_OP_FLAGS = {"-T": "no TTY", "-x": "no X11 forwarding", "-a": "no agent forwarding",
                "-q": "quiet", "-n": "no stdin"}
# ssh(1) options whose value names a local file: made absolute (the worker's working
# directory is the cell home, not the script's).
_PATH_OPTIONS = ("identityfile", "userknownhostsfile", "globalknownhostsfile")
_BAD_HOST = re.compile(r"[\s/\0@]|^-")


class SlurmConfigError(ConfigError, ValueError):
    """A :class:`SlurmBackend` argument is invalid (names the argument)."""


@dataclass
class SSHArguments:
    """What an ``ssh_extra`` list stands for, in the transport's terms."""

    options: dict[str, str] = field(default_factory=dict)   # OpenSSH name -> value
    key: str | None = None                                  # the first ``-i``
    port: int | None = None
    user: str | None = None


def _fail(message: str) -> SlurmConfigError:
    return SlurmConfigError(message)


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute())


def _set_once(current: Any, value: Any, what: str, arg: str) -> Any:
    if current is not None and current != value:
        raise _fail(f"ssh_extra: {arg!r} sets the {what} to {value!r}, but it is already "
                    f"{current!r}")
    return value


def _port(text: str, arg: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise _fail(f"ssh_extra: {arg!r}: the port must be a number 1-65535") from None
    if not 1 <= port <= 65535:
        raise _fail(f"ssh_extra: {arg!r}: the port must be a number 1-65535")
    return port


def _option(result: SSHArguments, text: str, arg: str) -> None:
    """One ``-o`` value (``Name=Value`` or ``Name Value``, like ssh_config)."""
    match = re.fullmatch(r"\s*([A-Za-z][A-Za-z0-9]*)\s*(?:=\s*|\s+)(.*?)\s*", text)
    if match is None or not match.group(2):
        raise _fail(f"ssh_extra: {arg!r} is not an option: use '-o Name=Value'")
    name, value = match.group(1), match.group(2)
    key = name.lower()
    if key == "port":
        result.port = _set_once(result.port, _port(value, arg), "port", arg)
        return
    if key == "user":
        result.user = _set_once(result.user, value, "user", arg)
        return
    if key == "hostname":
        raise _fail(f"ssh_extra: {arg!r}: the host is login_host")
    if key in _PATH_OPTIONS and value.lower() != "none":
        if len(value.split()) != 1:
            raise _fail(f"ssh_extra: {arg!r}: paths with spaces are not supported")
        value = _absolute(value)
    for existing, old in result.options.items():
        if existing.lower() == key:
            if key == "identityfile":
                result.options[existing] = f"{old} {value}"
                return
            if old != value:
                raise _fail(f"ssh_extra: {arg!r} sets {name} again, to another value "
                            f"(already {old!r})")
            return
    result.options[name] = value


def parse_ssh_extra(args: Sequence[str] | None) -> SSHArguments:
    """Translate ssh(1) command-line arguments for the asyncssh transport.

    Supported: ``-o Name=Value`` / ``-oName=Value`` (``-o Port=``/``User=`` set the port
    and user), ``-i PATH`` (the key; more ``-i`` add IdentityFile), ``-p PORT``,
    ``-l USER``, ``-J HOST`` (ProxyJump), ``-C`` (Compression) and the no-op flags
    ``-T -x -a -q -n``. Anything else raises :class:`SlurmConfigError` naming it.
    """
    result = SSHArguments()
    if args is None:
        return result
    if isinstance(args, (str, bytes)) or not all(isinstance(a, str) for a in args):
        raise _fail(f"ssh_extra must be a list of strings (ssh arguments), got {args!r}")
    items = list(args)
    i = 0
    while i < len(items):
        arg = items[i]
        i += 1
        if arg in _NO_OP_FLAGS:
            continue
        if arg == "-C":
            _option(result, "Compression=yes", arg)
            continue
        flag, attached = arg[:2], arg[2:]
        if flag not in ("-o", "-i", "-p", "-l", "-J"):
            raise _fail(f"ssh_extra: unsupported ssh argument {arg!r} (the transport is "
                        "asyncssh, not the ssh program; supported: -o Name=Value, -i KEY, "
                        "-p PORT, -l USER, -J HOST, -C, and -T -x -a -q -n)")
        if attached:
            value = attached
        elif i < len(items):
            value = items[i]
            i += 1
        else:
            raise _fail(f"ssh_extra: {arg!r} needs a value after it")
        shown = f"{arg} {value}" if not attached else arg
        if not value.strip() or "\0" in value or "\n" in value:
            raise _fail(f"ssh_extra: {shown!r}: empty or multi-line value")
        if flag == "-o":
            _option(result, value, shown)
        elif flag == "-i":
            path = _absolute(value)
            if result.key is None:
                result.key = path
            elif path != result.key:
                _option(result, f"IdentityFile={path}", shown)
        elif flag == "-p":
            result.port = _set_once(result.port, _port(value, shown), "port", shown)
        elif flag == "-l":
            result.user = _set_once(result.user, value, "user", shown)
        else:
            _option(result, f"ProxyJump={value}", shown)
    return result


def _string_list(value: Sequence[str] | None, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not all(isinstance(v, str) for v in value):
        raise _fail(f"{name} must be a list of strings, got {value!r}")
    if any("\0" in v for v in value):
        raise _fail(f"{name}: an item contains a NUL character")
    return list(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]", "_", text)


def default_home(login_host: str, login_user: str | None = None,
                 login_port: int | None = None) -> Path:
    """The dedicated cell home of a login host: ``slurm-[user@]host[-port]`` inside the
    default cell home (``$JOBCELL_HOME``, else the user data dir, which follows
    ``$XDG_DATA_HOME``)."""
    from jobcell.home import resolve_home

    name = f"{login_user + '@' if login_user else ''}{login_host}"
    if login_port is not None and login_port != 22:
        name += f"-{login_port}"
    return resolve_home(None) / f"slurm-{_slug(name)}"


class SlurmBackend(LocalBackend):
    """A local cell whose executor is Slurm over SSH (see the module documentation).

    ``login_host``: the SSH login node (``user@host`` also works); ``slurm_tmp_io``: an
    absolute directory the login and compute nodes share (attempts are staged there);
    ``slurm_tmp_io_local``: where that directory is mounted here, if it is (plain
    copies instead of SFTP); ``login_user``; ``ssh_extra``: ssh(1) arguments (see
    :func:`parse_ssh_extra`); ``sbatch_extra``: more sbatch arguments;
    ``slurm_script_shell``; ``preparation_script_before`` / ``_after``: lines of the
    batch script around the step's exports; ``debug_slurm_script``: print each batch
    script to the worker log (``<home>/worker.log``). Keyword-only: ``home``,
    ``login_port``, ``ssh_key``, ``partition``, ``settings`` (more cell options, such as
    ``slurm_account``, ``slurm_env`` or ``backend_poll_interval_s``), the polling
    intervals and ``owner``.
    """

    def __init__(self, login_host: str, slurm_tmp_io: str,
                 slurm_tmp_io_local: str | os.PathLike[str] | None = None,
                 login_user: str | None = None, ssh_extra: Sequence[str] | None = None,
                 sbatch_extra: Sequence[str] | None = None,
                 slurm_script_shell: str = "/bin/bash",
                 preparation_script_before: Sequence[str] | None = None,
                 preparation_script_after: Sequence[str] | None = None,
                 debug_slurm_script: bool = False, *,
                 home: str | os.PathLike[str] | None = None, login_port: int | None = None,
                 ssh_key: str | os.PathLike[str] | None = None, partition: str | None = None,
                 settings: Mapping[str, Any] | None = None, poll_interval_s: float = 0.5,
                 max_poll_interval_s: float = 5.0, owner: str | None = None) -> None:
        if not isinstance(login_host, str) or not login_host.strip():
            raise _fail(f"login_host must be a host name, got {login_host!r}")
        login_host = login_host.strip()
        if "@" in login_host:
            user_part, _, login_host = login_host.rpartition("@")
            if login_user is not None and login_user != user_part:
                raise _fail(f"login_host names user {user_part!r} but login_user is "
                            f"{login_user!r}")
            login_user = user_part
        if _BAD_HOST.search(login_host):
            raise _fail(f"login_host must be a host name, got {login_host!r}")
        ssh = parse_ssh_extra(ssh_extra)
        user = self._same("user", login_user, ssh.user, "login_user", "-l")
        if user is not None and (not isinstance(user, str) or not user.strip()
                                 or re.search(r"[\s@\0]", user)):
            raise _fail(f"login_user must be a user name, got {user!r}")
        if login_port is not None and (isinstance(login_port, bool)
                                       or not isinstance(login_port, int)
                                       or not 1 <= login_port <= 65535):
            raise _fail(f"login_port must be a number 1-65535, got {login_port!r}")
        port = self._same("port", login_port, ssh.port, "login_port", "-p")
        key = self._same("SSH key", None if ssh_key is None else _absolute(os.fspath(ssh_key)),
                         ssh.key, "ssh_key", "-i")
        if key is not None and not Path(key).is_file():
            raise _fail(f"the SSH key {key} is not a readable file")
        if not isinstance(slurm_tmp_io, str) or not slurm_tmp_io.startswith("/") or \
                "\0" in slurm_tmp_io or "\n" in slurm_tmp_io:
            raise _fail("slurm_tmp_io must be an absolute path on the login and compute "
                        f"nodes, got {slurm_tmp_io!r}")
        tmp_io = posixpath.normpath(slurm_tmp_io)
        tmp_io_local = None
        if slurm_tmp_io_local is not None:
            tmp_io_local = _absolute(os.fspath(slurm_tmp_io_local))
            if not Path(tmp_io_local).is_dir():
                raise _fail(f"slurm_tmp_io_local {tmp_io_local} is not a directory here")
        if not isinstance(slurm_script_shell, str) or not slurm_script_shell.startswith("/"):
            raise _fail(f"slurm_script_shell must be an absolute path to a shell, got "
                        f"{slurm_script_shell!r}")
        if not isinstance(debug_slurm_script, bool):
            raise _fail(f"debug_slurm_script must be True or False, got "
                        f"{debug_slurm_script!r}")
        if partition is not None and (not isinstance(partition, str) or not partition.strip()):
            raise _fail(f"partition must be a partition name, got {partition!r}")
        for name, value in (("poll_interval_s", poll_interval_s),
                            ("max_poll_interval_s", max_poll_interval_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not 0 < value < float("inf"):
                raise _fail(f"{name} must be a positive number of seconds, got {value!r}")
        options: dict[str, Any] = {
            "executor_backend": "slurm", "slurm_login_host": login_host,
            "slurm_login_user": user, "slurm_login_port": port if port is not None else 22,
            "slurm_ssh_key": key, "slurm_ssh_options": dict(ssh.options),
            "slurm_tmp_io": tmp_io, "slurm_tmp_io_local": tmp_io_local,
            "sbatch_extra": _string_list(sbatch_extra, "sbatch_extra"),
            "slurm_script_shell": slurm_script_shell,
            "preparation_script_before": _string_list(preparation_script_before,
                                                      "preparation_script_before"),
            "preparation_script_after": _string_list(preparation_script_after,
                                                     "preparation_script_after"),
            "debug_slurm_script": debug_slurm_script, "slurm_partition": partition}
        extra = self._extra_settings(settings)
        self._validate(options, extra)
        self.login_host = login_host
        self.login_user = user
        self.login_port = port if port is not None else 22
        self.slurm_tmp_io = tmp_io
        self.slurm_tmp_io_local = tmp_io_local
        # The options written to the cell's jobcell.toml (None: the option's default).
        self.options: dict[str, Any] = {**options, **extra}
        resolved = (Path(home).expanduser().absolute() if home is not None
                    else default_home(login_host, user, port))
        super().__init__(resolved, poll_interval_s=float(poll_interval_s),
                         max_poll_interval_s=float(max_poll_interval_s), owner=owner)

    @staticmethod
    def _same(what: str, argument: Any, from_ssh: Any, name: str, flag: str) -> Any:
        if argument is not None and from_ssh is not None and argument != from_ssh:
            raise _fail(f"{name}={argument!r} and ssh_extra {flag} {from_ssh!r} name "
                        f"different {what}s")
        return argument if argument is not None else from_ssh

    @staticmethod
    def _extra_settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
        if settings is None:
            return {}
        if not isinstance(settings, Mapping):
            raise _fail(f"settings must be a dict of cell options, got {settings!r}")
        from jobcell.settings import OPTIONS

        extra: dict[str, Any] = {}
        for name, value in settings.items():
            if name in OWNED_OPTIONS:
                raise _fail(f"settings: option {name!r} is set by the SlurmBackend argument "
                            f"{OWNED_OPTIONS[name]}, not through settings")
            if name not in OPTIONS:
                raise _fail(f"settings: unknown cell option {name!r}")
            if value is None:
                continue
            extra[name] = _plain(value, f"settings[{name!r}]")
        return extra

    def _validate(self, options: dict[str, Any], extra: dict[str, Any]) -> None:
        from jobcell.executors.ssh import SSHTransport
        from jobcell.settings import load_settings

        given = {k: v for k, v in {**options, **extra}.items() if v is not None}
        try:
            load_settings(None, env={}, overrides=given)
        except ConfigError as exc:
            raise _fail(f"SlurmBackend: {exc}") from None
        try:   # checks the SSH option names and values; connects to nothing
            SSHTransport(options["slurm_login_host"], user=options["slurm_login_user"],
                         port=options["slurm_login_port"], key_path=options["slurm_ssh_key"],
                         options=options["slurm_ssh_options"])
        except ValueError as exc:
            raise _fail(f"ssh_extra: {exc}") from None

    def __repr__(self) -> str:
        user = f", login_user={self.login_user!r}" if self.login_user else ""
        port = f", login_port={self.login_port}" if self.login_port != 22 else ""
        return (f"SlurmBackend(login_host={self.login_host!r}{user}{port}, "
                f"slurm_tmp_io={self.slurm_tmp_io!r}, home={str(self.home)!r})")

    @property
    def identity(self) -> str:
        return f"slurm:{self.login_user or ''}@{self.login_host}:{self.home}"

    @property
    def cell(self) -> Cell:
        """The opened cell, its ``jobcell.toml`` holding this backend's options."""
        with self._lock:
            if self._cell is None:
                from jobcell.home import open_home
                from jobcell.service import Cell

                home = open_home(self.home)
                changed = configure_home(home, self.options)
                cell = Cell(home)
                try:
                    _check_effective(cell, self.options)
                    if changed:
                        _restart_worker(cell)
                except BaseException:
                    cell.close()
                    raise
                self._cell = cell
            return self._cell


def _plain(value: Any, where: str) -> Any:
    """``value`` as TOML can hold it (str, bool, int, float, list, dict of str keys)."""
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, where) for k, v in value.items() if v is not None}
    raise _fail(f"{where}: {value!r} cannot be written to jobcell.toml")


# -- the cell's jobcell.toml


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    # A JSON string is a TOML basic string, except that TOML wants DEL escaped too.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}"
                                for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_toml(document: dict[str, Any], header: str = "") -> str:
    """``document`` as TOML: values inline, except a ``jobcell`` table (a section)."""
    section = document.get("jobcell") if isinstance(document.get("jobcell"), dict) else None
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in document.items()
              if not (k == "jobcell" and section is not None)]
    if section is not None:
        lines += ["", "[jobcell]", *(f"{_toml_key(k)} = {_toml_value(v)}"
                                     for k, v in section.items())]
    text = "\n".join(lines) + "\n"
    if tomllib.loads(text) != document:   # never write what would read back otherwise
        raise ConfigError("cannot write the cell options as TOML faithfully")
    return text


HEADER = ("Cell options. SlurmBackend (jobcell.client) manages the options listed in\n"
          f"{STATE_FILE}; change them through its arguments. Others are yours.")


@contextlib.contextmanager
def _locked(home: CellHome) -> Iterator[None]:
    with (home.locks / LOCK_FILE).open("w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        yield


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_document(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def _read_state(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    written = data.get("written") if isinstance(data, dict) else None
    return written if isinstance(written, dict) else {}


_MISSING = object()


def configure_home(home: CellHome, options: Mapping[str, Any]) -> bool:
    """Make ``<home>/jobcell.toml`` hold ``options`` (None: not set, the default).

    Replaces only values this function wrote before (recorded in ``slurm-backend.json``)
    or equal ones; a different value from anyone else raises :class:`ConfigError`.
    Options it wrote before and no longer manages are removed when unchanged since.
    Returns whether the file changed."""
    path = home.config_file
    with _locked(home):
        document = _read_document(path)
        table: dict[str, Any] = (document["jobcell"] if isinstance(document.get("jobcell"),
                                                                    dict) else document)
        state_file = home.root / STATE_FILE
        if not state_file.exists() and home.db_path.exists() and \
                table.get("executor_backend", "embedded") != "slurm":
            raise ConfigError(
                f"{home.root} is an existing cell (executor "
                f"{table.get('executor_backend', 'embedded')!r}) that SlurmBackend did not "
                "set up: it will not turn it into a Slurm cell. Give the backend a home of "
                "its own (home=..., or the default), or set executor_backend = \"slurm\" "
                f"in {path} first")
        ours = _read_state(state_file)
        wanted = {k: v for k, v in options.items() if v is not None}
        changed = False
        conflicts = []
        for name in dict.fromkeys([*options, *ours]):
            current = table.get(name, _MISSING)
            want = wanted.get(name, _MISSING)
            if current == want:
                continue
            mine = current is _MISSING or (name in ours and ours[name] == current)
            if name not in options:        # no longer managed: drop it if still ours
                if mine and current is not _MISSING:
                    del table[name]
                    changed = True
                continue
            if not mine:
                conflicts.append(f"{name} = {_toml_value(current)}")
                continue
            if want is _MISSING:
                del table[name]
            else:
                table[name] = want
            changed = True
        if conflicts:
            raise ConfigError(
                f"{path} already sets {', '.join(conflicts)}, which SlurmBackend would "
                "change: remove these options from the file, pass the same values, or "
                "give the backend a home of its own (home=...)")
        if changed:
            _atomic_write(path, dump_toml(document, HEADER))
        if changed or ours != wanted or not state_file.exists():
            _atomic_write(state_file,
                          json.dumps({"written": wanted}, indent=2, sort_keys=True) + "\n")
        return changed


def _check_effective(cell: Cell, options: Mapping[str, Any]) -> None:
    """Refuse when the worker would not run with ``options`` (an environment variable
    overrides the file)."""
    from jobcell.settings import OPTIONS, load_settings

    wanted = load_settings(None, env={}, overrides={k: v for k, v in options.items()
                                                    if v is not None})
    for name in options:
        value = wanted.values[name] if options[name] is not None else OPTIONS[name].default
        if cell.settings.values[name] != value:
            raise ConfigError(
                f"the cell option {name!r} of {cell.home.root} is "
                f"{cell.settings.values[name]!r} from {cell.settings.sources[name]}, but "
                f"SlurmBackend sets it to {value!r}: unset that to use this backend")


def _restart_worker(cell: Cell) -> None:
    """Stop a live worker that still runs with the old options (a new one starts on the
    next submit or poll)."""
    if not cell.worker_status()["alive"]:
        return
    try:
        cell.stop_worker()
        logger.info("stopped the worker of %s: its options changed", cell.home.root)
    except WorkerError as exc:
        logger.warning("the options of %s changed, but its worker could not be stopped "
                       "(%s): it runs with the old ones until it exits", cell.home.root, exc)


__all__ = ["OWNED_OPTIONS", "SSHArguments", "SlurmBackend", "SlurmConfigError",
           "configure_home", "default_home", "dump_toml", "parse_ssh_extra"]
