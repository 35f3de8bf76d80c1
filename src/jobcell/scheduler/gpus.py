"""GPUs the cell may lease: ``nvidia-smi`` parsed, narrowed by the visible-devices variables.

Everything here is a pure function of text and mappings except :func:`run_nvidia_smi`,
the one place a process is started, and :func:`detect_gpus`, which ties them together.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

GPU_QUERY = ("--query-gpu=index,memory.total,name", "--format=csv,noheader,nounits")
UUID_QUERY = ("--query-gpu=index,uuid", "--format=csv,noheader")
NVIDIA_SMI_TIMEOUT_S = 10.0
# Values that mean "no device": CUDA's -1, the container runtime's none/void, and what
# Slurm writes when a job was given no GPUs.
NO_DEVICES = frozenset({"", "-1", "none", "void", "nodevfiles"})
DECLARED_NAME = "declared by gpu_count"


@dataclass(frozen=True)
class GpuDevice:
    """One GPU: its index as nvidia-smi reports it (what CUDA_VISIBLE_DEVICES gets)."""

    index: str
    memory_mb: int | None
    name: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"index": self.index, "memory_mb": self.memory_mb, "name": self.name}


@dataclass(frozen=True)
class SmiResult:
    """The outcome of one nvidia-smi query: its stdout, or why there is none."""

    stdout: str | None
    problem: str = ""


def plural(count: float, noun: str) -> str:
    """``count`` and ``noun``, with an "s" unless the count is exactly one ("1.5 CPUs")."""
    number = str(int(count)) if count == int(count) else f"{count:g}"
    return f"{number} {noun}" if count == 1 else f"{number} {noun}s"


def parse_gpu_table(text: str) -> tuple[GpuDevice, ...]:
    """Devices from ``index, memory.total, name`` CSV rows; ValueError on a bad row."""
    devices = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split(",", 2)]
        if len(fields) != 3 or not fields[0].isdigit():
            raise ValueError(line)
        devices.append(GpuDevice(fields[0], _memory_mb(fields[1]), fields[2]))
    return tuple(devices)


def _memory_mb(text: str) -> int | None:
    # nvidia-smi prints "[N/A]" (or "[Not Supported]") where it cannot tell.
    return int(text) if text.isdigit() else None


def parse_uuid_table(text: str) -> dict[str, str]:
    """``{uuid: index}`` from ``index, uuid`` CSV rows; ValueError on a bad row."""
    found = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 2 or not fields[0].isdigit():
            raise ValueError(line)
        found[fields[1]] = fields[0]
    return found


def visible_entries(value: str | None) -> list[str] | None:
    """Entries of a visible-devices variable: None = all, [] = none, else the list."""
    if value is None or value.strip().lower() == "all":
        return None
    if value.strip().lower() in NO_DEVICES:
        return []
    return [entry.strip() for entry in value.split(",") if entry.strip()]


def needs_uuids(entries: Sequence[str]) -> bool:
    """True when some entry names a device by UUID or MIG id rather than by index."""
    return any(not entry.isdigit() for entry in entries)


def resolve_entry(entry: str, uuids: Mapping[str, str]) -> str | None:
    """The index an entry names: itself when numeric, else via the UUID map (or None)."""
    if entry.isdigit():
        return entry
    if entry.startswith("MIG-GPU-"):
        # Old-style MIG ids "MIG-GPU-<uuid>/<gi>/<ci>" name their parent GPU.
        entry = entry.removeprefix("MIG-").split("/", 1)[0]
    if entry in uuids:
        return uuids[entry]
    # CUDA accepts any unambiguous UUID prefix.
    matches = {index for uuid, index in uuids.items() if uuid.startswith(entry)}
    return matches.pop() if len(matches) == 1 and entry.startswith("GPU-") else None


def select_devices(devices: Sequence[GpuDevice], indices: Sequence[str | None]
                   ) -> tuple[GpuDevice, ...]:
    """The devices with the given indices, in that order, once each; unknown ones skipped."""
    by_index = {device.index: device for device in devices}
    chosen = [index for index in dict.fromkeys(indices) if index is not None]
    return tuple(by_index[index] for index in chosen if index in by_index)


def declared_devices(count: int) -> tuple[GpuDevice, ...]:
    """``count`` devices an admin declared without nvidia-smi seeing them."""
    return tuple(GpuDevice(str(index), None, DECLARED_NAME) for index in range(count))


def apply_gpu_count(devices: tuple[GpuDevice, ...], source: str, gpu_count: int | str
                    ) -> tuple[tuple[GpuDevice, ...], str]:
    """Devices and source after the ``gpu_count`` option ('auto' or a non-negative int)."""
    if gpu_count == "auto":
        return devices, source
    count = int(gpu_count)
    if count == 0:
        return (), "option gpu_count (0)"
    if len(devices) >= count:
        return devices[:count], f"option gpu_count (first {count} of {source})"
    return declared_devices(count), f"option gpu_count (declared {count}; {source})"


def run_nvidia_smi(executable: str, arguments: Sequence[str],
                   env: Mapping[str, str]) -> SmiResult:
    """Run nvidia-smi with an argv list (never a shell); stdout, or why it failed."""
    try:
        done = subprocess.run([executable, *arguments], capture_output=True, text=True,
                              env=dict(env), timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return SmiResult(None, f"nvidia-smi timed out after {NVIDIA_SMI_TIMEOUT_S:g} s")
    except OSError as exc:
        return SmiResult(None, f"nvidia-smi could not run: {exc.strerror or exc}")
    if done.returncode != 0:
        return SmiResult(None, f"nvidia-smi failed (exit {done.returncode}): "
                               f"{_first_line(done.stderr) or _first_line(done.stdout)}")
    return SmiResult(done.stdout)


def _first_line(text: str | None) -> str:
    return next((line.strip() for line in (text or "").splitlines() if line.strip()), "")


def find_nvidia_smi(nvidia_smi: str, env: Mapping[str, str]) -> str | None:
    """The nvidia-smi executable on ``env``'s PATH (or the path given), or None."""
    return shutil.which(nvidia_smi, path=env.get("PATH", os.defpath))


def list_gpus(executable: str, env: Mapping[str, str]) -> tuple[tuple[GpuDevice, ...], str]:
    """Every GPU nvidia-smi lists, and a source saying how (or why none)."""
    result = run_nvidia_smi(executable, GPU_QUERY, env)
    if result.stdout is None:
        return (), result.problem
    try:
        devices = parse_gpu_table(result.stdout)
    except ValueError as exc:
        return (), f"nvidia-smi output not understood: {str(exc)[:80]!r}"
    return devices, f"nvidia-smi ({plural(len(devices), 'GPU')})"


def visibility_variable(env: Mapping[str, str]) -> tuple[str, str] | None:
    """The variable that narrows the devices (CUDA_VISIBLE_DEVICES first) and its value."""
    for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        if name in env:
            return name, env[name]
    return None


def narrow_to_visible(devices: tuple[GpuDevice, ...], source: str, executable: str,
                      env: Mapping[str, str]) -> tuple[tuple[GpuDevice, ...], str]:
    """Devices left after CUDA_VISIBLE_DEVICES / NVIDIA_VISIBLE_DEVICES, with the source."""
    variable = visibility_variable(env)
    entries = None if variable is None else visible_entries(variable[1])
    if variable is None or entries is None or not devices:
        return devices, source
    name, value = variable
    uuids: dict[str, str] = {}
    if needs_uuids(entries):
        mapped = _uuid_map(executable, env)
        if isinstance(mapped, str):
            return devices, f"{source}; {name}={value} not applied: {mapped}"
        uuids = mapped
    indices = [resolve_entry(entry, uuids) for entry in entries]
    unmapped = [entry for entry, index in zip(entries, indices, strict=True)
                if index is None and entry.startswith("MIG-")]
    if unmapped:
        # A MIG device's own UUID is not in nvidia-smi's GPU list; dropping every GPU
        # would hide the slice the job was given, so keep them and say so.
        return devices, f"{source}; {name}={value} not applied: cannot map {unmapped[0]}"
    chosen = select_devices(devices, indices)
    if not chosen and entries and name == "NVIDIA_VISIBLE_DEVICES":
        # Inside a container the runtime already narrowed (and renumbered) the devices
        # nvidia-smi lists, so host indices that match nothing say nothing about them.
        return devices, f"{source}; {name}={value} matches none of them, kept all"
    return chosen, f"{source}, {len(chosen)} visible by {name}={value}"


def _uuid_map(executable: str, env: Mapping[str, str]) -> dict[str, str] | str:
    """``{uuid: index}`` from nvidia-smi, or a string saying why it is unavailable."""
    result = run_nvidia_smi(executable, UUID_QUERY, env)
    if result.stdout is None:
        return f"cannot map UUIDs ({result.problem})"
    try:
        return parse_uuid_table(result.stdout)
    except ValueError:
        return "cannot map UUIDs (nvidia-smi output not understood)"


def detect_gpus(env: Mapping[str, str], nvidia_smi: str = "nvidia-smi"
                ) -> tuple[tuple[GpuDevice, ...], str]:
    """GPUs this process may use, per nvidia-smi and the visible-devices variables."""
    executable = find_nvidia_smi(nvidia_smi, env)
    if executable is None:
        return (), "nvidia-smi not found"
    devices, source = list_gpus(executable, env)
    return narrow_to_visible(devices, source, executable, env)
