"""Fake machines for capacity tests: file trees standing in for ``/`` and a fake nvidia-smi."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

# What cgroup v1 writes for "no memory limit": LONG_MAX rounded down to a 4 KiB page.
V1_UNLIMITED = "9223372036854771712"
GIB = 1024 ** 3

GPU_TABLE = "0, 81559, NVIDIA H100 80GB HBM3\n1, 40960, NVIDIA A100-PCIE-40GB\n"
UUID_TABLE = ("0, GPU-11111111-2222-3333-4444-555555555555\n"
              "1, GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee\n")


def write_files(root: Path, files: Mapping[str, str | bytes]) -> Path:
    """Create ``files`` ({path relative to root: content}) under ``root``; return root."""
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


def meminfo(total_mb: int) -> str:
    """``/proc/meminfo`` text for a machine with ``total_mb`` MB (the file speaks kB)."""
    return (f"MemTotal:       {total_mb * 1024} kB\n"
            f"MemFree:        {total_mb * 512} kB\n"
            f"MemAvailable:   {total_mb * 768} kB\n")


def fake_nvidia_smi(bin_dir: Path, gpus: str = GPU_TABLE, uuids: str | None = UUID_TABLE,
                    exit_code: int = 0, message: str = "") -> Path:
    """Write an executable ``nvidia-smi`` into ``bin_dir`` answering the two queries we use.

    ``uuids=None`` makes the UUID query fail; a non-zero ``exit_code`` makes every call
    fail with ``message`` on stderr. Each call appends its arguments to ``calls.log``.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    uuid_branch = (f"printf '%s' '{uuids}'" if uuids is not None
                   else "echo 'uuid query unsupported' >&2; exit 3")
    script = bin_dir / "nvidia-smi"
    script.write_text(f"""#!/bin/sh
echo "$@" >> '{bin_dir / "calls.log"}'
if [ {exit_code} -ne 0 ]; then echo '{message}' >&2; exit {exit_code}; fi
case "$1 $2" in
  "--query-gpu=index,memory.total,name --format=csv,noheader,nounits") printf '%s' '{gpus}' ;;
  "--query-gpu=index,uuid --format=csv,noheader") {uuid_branch} ;;
  *) echo "unexpected arguments: $*" >&2; exit 2 ;;
esac
""")
    script.chmod(0o755)
    return script
