"""How a delegated executor reaches its backend: local commands, or one SSH connection.

Every argv stays a list until the transport runs it; the SSH transport joins it with
``shlex.join`` for the remote shell, so no user value is ever interpreted by a shell.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class TransportError(Exception):
    """The command could not be run at all (connection lost, program missing, timeout):
    its outcome is unknown, never a failure of the step."""


@dataclass(frozen=True)
class CommandResult:
    """What a command printed and how it ended."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        """One line for logs and errors: the program, its exit status, its first words."""
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        first = text[0][:300] if text else "no output"
        return f"{os.path.basename(self.argv[0])} exited {self.returncode}: {first}"


class Transport(Protocol):
    """Run commands and move files on the backend's side."""

    description: str

    def run(self, argv: Sequence[str], *, input_text: str | None = None,
            timeout: float = 60.0, env: Mapping[str, str] | None = None) -> CommandResult:
        """Run ``argv`` (``env`` added to the backend's environment); raise
        :class:`TransportError` when it could not be run or did not end in ``timeout``."""
        ...

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write a file atomically (temp file + rename), creating its directory."""
        ...

    def read_file(self, path: str) -> bytes | None:
        """A file's content, or None when it does not exist."""
        ...

    def put_tree(self, local: Path, remote: str) -> None:
        """Copy a local directory tree to ``remote`` (merged into what is there)."""
        ...

    def get_tree(self, remote: str, local: Path) -> None:
        """Copy a backend directory tree into ``local`` (merged into what is there)."""
        ...

    def remove_tree(self, path: str) -> None:
        """Remove a backend directory tree; missing is fine."""
        ...

    def close(self) -> None:
        ...


class LocalTransport:
    """Commands run here as child processes; files are local paths."""

    description = "local commands"

    def run(self, argv: Sequence[str], *, input_text: str | None = None,
            timeout: float = 60.0, env: Mapping[str, str] | None = None) -> CommandResult:
        full_env = {**os.environ, **env} if env else None
        try:
            # A stray non-UTF-8 byte (another user's job name) must not break a round.
            done = subprocess.run(list(argv), input=input_text, capture_output=True, text=True,
                                  errors="replace", timeout=timeout, env=full_env,
                                  stdin=None if input_text is not None else subprocess.DEVNULL)
        except FileNotFoundError:
            raise TransportError(f"{argv[0]}: program not found") from None
        except PermissionError:
            raise TransportError(f"{argv[0]}: not executable") from None
        except subprocess.TimeoutExpired:
            raise TransportError(f"{argv[0]} did not answer in {timeout:g} s") from None
        except OSError as exc:
            raise TransportError(f"{argv[0]}: {exc.strerror or exc}") from None
        return CommandResult(tuple(argv), done.returncode, done.stdout, done.stderr)

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.chmod(mode)
        os.replace(tmp, target)

    def read_file(self, path: str) -> bytes | None:
        try:
            return Path(path).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def put_tree(self, local: Path, remote: str) -> None:
        shutil.copytree(local, remote, dirs_exist_ok=True, symlinks=True)

    def get_tree(self, remote: str, local: Path) -> None:
        shutil.copytree(remote, local, dirs_exist_ok=True, symlinks=True)

    def remove_tree(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        return None
