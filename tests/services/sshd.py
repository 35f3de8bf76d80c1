"""A real OpenSSH server on 127.0.0.1 for tests that log in over SSH.

Keys live under ``root``: an ed25519 host key (``host_key``), an ed25519 user key
(``user_key``, passphrase-less) and a ``known_hosts`` file naming the host key as
``[127.0.0.1]:<port>``. The user's public key is appended to
``~/.ssh/authorized_keys`` of the current user with a unique comment, and exactly
that line is removed again by :meth:`SSHServer.stop` (or at interpreter exit). If the
test process is killed outright, a guard process (``tests.services.Reaper``) kills the
listening sshd with all its sessions and removes the line.

sshd reads the system ``/etc/ssh/sshd_config`` (so the sftp subsystem is as on a
normal Debian host) with overrides on the command line, among them
``MaxSessions=100`` and ``MaxStartups=100:30:200`` because clients multiplex many
channels over one connection, and ``UsePAM=no``: with PAM each new channel costs
~0.4 s on the test machine (pam_systemd looking for logind, pam_motd), without it
~0.1 s. PAM stays on when the user's password is locked with ``!`` (sshd refuses
such accounts without PAM). Opening channels is serialized inside sshd; 40
concurrent commands on one connection take ~4 s to all start.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import getpass
import os
import pwd
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from . import Reaper, ServiceError, free_ports, log_tail, wait_gone

SSHD = "/usr/sbin/sshd"


class SSHServer:
    """``sshd -D`` on ``127.0.0.1:<port>`` accepting ``key_path`` for ``user``."""

    host = "127.0.0.1"

    def __init__(self, root: Path, *, port: int | None = None) -> None:
        self.root = Path(root).resolve()
        self.user = getpass.getuser()
        self.port = port or 0
        self.host_key = self.root / "ssh_host_ed25519_key"
        self.key_path = self.root / "id_ed25519"
        self.known_hosts = self.root / "known_hosts"
        self.pid_file = self.root / "sshd.pid"
        self.log_path = self.root / "sshd.log"
        self.authorized_keys = Path(pwd.getpwnam(self.user).pw_dir) / ".ssh" / "authorized_keys"
        self._key_line: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._reaper: Reaper | None = None
        self._atexit_registered = False

    # ---- public API -------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> SSHServer:
        """Create keys (once), authorize the user key and start sshd; returns once the
        port answers with an SSH banner."""
        if self._proc is not None:
            raise ServiceError("sshd already started")
        if not os.path.exists(SSHD):
            raise ServiceError(f"{SSHD} not found (apt-get install openssh-server)")
        self.root.mkdir(parents=True, exist_ok=True)
        self._make_keys()
        if not self.port:
            self.port = free_ports(1)[0]
        self._write_known_hosts()
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        self._authorize()
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        argv = [
            SSHD, "-D", "-e",
            "-p", str(self.port),
            "-h", str(self.host_key),
            "-o", f"ListenAddress={self.host}",
            "-o", f"PidFile={self.pid_file}",
            "-o", "PermitRootLogin=prohibit-password",
            "-o", "PasswordAuthentication=no",
            "-o", "KbdInteractiveAuthentication=no",
            "-o", "UseDNS=no",
            "-o", "MaxSessions=100",
            "-o", "MaxStartups=100:30:200",
            "-o", f"UsePAM={'yes' if self._needs_pam() else 'no'}",
        ]  # fmt: skip
        assert self._key_line is not None
        if self._reaper is None:
            self._reaper = Reaper(unline=(self.authorized_keys, self._key_line))
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # sshd overwrites its environment with its process title, so the guard tracks
        # the listener by pid; sessions are its descendants.
        self._reaper.watch(self._proc.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                self.stop()
                raise ServiceError(f"sshd exited with status {code}\n" + log_tail(self.log_path))
            if self._banner():
                return self
            time.sleep(0.05)
        self.stop()
        raise ServiceError(
            f"sshd did not answer on {self.host}:{self.port} in {timeout:.0f} s\n"
            + log_tail(self.log_path)
        )

    def stop(self, *, kill_sessions: bool = True) -> None:
        """Stop the listening sshd (and, unless told otherwise, every open session) and
        remove the authorized_keys line."""
        proc, self._proc = self._proc, None
        if proc is not None:
            sessions: list[psutil.Process] = []
            with contextlib.suppress(psutil.Error):
                sessions = psutil.Process(proc.pid).children(recursive=True)
            if not kill_sessions and self._reaper is not None:
                # They outlive the listener; the guard ends them at the final stop.
                self._reaper.watch(*(child.pid for child in sessions))
                sessions = []
            if kill_sessions:  # first, while the listener is there to reap them
                for child in sessions:
                    with contextlib.suppress(psutil.Error):
                        child.kill()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            wait_gone(sessions, timeout=3)
        if kill_sessions:
            reaper, self._reaper = self._reaper, None
            if reaper is not None:
                reaper.close()
        self._unauthorize()

    def restart(self, *, kill_sessions: bool = True) -> None:
        """Stop then start again on the same port with the same keys."""
        self.stop(kill_sessions=kill_sessions)
        self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def ssh_argv(self, *command: str) -> list[str]:
        """An ``ssh`` command line that logs in with the test key and runs ``command``."""
        return [
            "ssh", "-p", str(self.port), "-i", str(self.key_path),
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", "ConnectTimeout=10",
            f"{self.user}@{self.host}",
            *command,
        ]  # fmt: skip

    def __enter__(self) -> SSHServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- internals --------------------------------------------------------------

    def _make_keys(self) -> None:
        for path, comment in ((self.host_key, "jobcell-test-host"), (self.key_path, "")):
            if path.exists() and path.with_suffix(".pub").exists():
                continue
            path.unlink(missing_ok=True)
            comment = comment or f"jobcell-test-{secrets.token_hex(6)}"
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                check=True,
                capture_output=True,
                timeout=30,
            )
        self._key_line = (self.root / "id_ed25519.pub").read_text().strip()

    def _write_known_hosts(self) -> None:
        kind, blob = (self.root / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        self.known_hosts.write_text(f"[{self.host}]:{self.port} {kind} {blob}\n")

    @contextlib.contextmanager
    def _locked_authorized_keys(self) -> Iterator[Path]:
        path = self.authorized_keys
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield path
        finally:
            os.close(fd)

    def _authorize(self) -> None:
        assert self._key_line is not None
        with self._locked_authorized_keys() as path:
            lines = path.read_text().splitlines()
            if self._key_line not in lines:
                lines.append(self._key_line)
                _rewrite(path, lines)

    def _unauthorize(self) -> None:
        if self._key_line is None or not self.authorized_keys.exists():
            return
        with self._locked_authorized_keys() as path:
            lines = path.read_text().splitlines()
            if self._key_line in lines:
                _rewrite(path, [line for line in lines if line != self._key_line])

    def _needs_pam(self) -> bool:
        """Without PAM, sshd refuses accounts whose password is locked with ``!``; PAM
        makes every session ~4x slower here (pam_systemd, pam_motd), so use it only
        when that lock would bite."""
        try:
            with open("/etc/shadow") as fh:
                for line in fh:
                    name, _, rest = line.partition(":")
                    if name == self.user:
                        return rest.startswith("!")
        except OSError:
            return True
        return True

    def _banner(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as sock:
                return sock.recv(64).startswith(b"SSH-")
        except OSError:
            return False


def _rewrite(path: Path, lines: list[str]) -> None:
    """Rewrite in place (keeps the inode, so a concurrent flock holder stays valid)."""
    with open(path, "r+") as fh:
        fh.seek(0)
        fh.write("".join(f"{line}\n" for line in lines))
        fh.truncate()
