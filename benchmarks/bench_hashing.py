"""Input hashing for the step cache: BLAKE3 vs SHA-256 throughput, and the memoised re-hash.

One file of random bytes (1 GiB by default) is written to a temporary directory
and read once to warm the page cache (that read is discarded). Each method then
reads it in 1 MiB chunks ``--repeat`` times; medians are reported:

- ``file_digest``: ``jobcell.cache.file_digest`` without a memo (one-thread BLAKE3);
- ``blake3, AUTO threads``: the same loop with ``max_threads=blake3.AUTO`` (and,
  for comparison, with 4 MiB reads, where the threads have more work per call);
- ``sha256``: ``hashlib.sha256`` with the same loop;
- ``read only``: the loop without hashing (the ceiling set by reading).

Then ``file_digest`` with a warm ``MemoryHashMemo`` is called ``--calls`` times
(one ``os.stat`` and a memo lookup each).

Target: a memoised re-hash under 1 ms.

    .venv/bin/python benchmarks/bench_hashing.py [--size-mb 1024] [--repeat 3] [--calls 1000]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
from _common import clean_env, emit, filesystem, machine, percentile, timed

from jobcell.cache import CHUNK_BYTES, MemoryHashMemo, file_digest

TARGET_MEMO_US = 1000.0


def write_random_file(path: Path, size_mb: int) -> None:
    """``size_mb`` MiB of pseudo-random bytes (incompressible; seeded, so runs compare)."""
    generator = random.Random(42)
    with open(path, "wb") as handle:
        for _ in range(size_mb):
            handle.write(generator.randbytes(CHUNK_BYTES))


def chunked(path: Path, update: Callable[[memoryview], Any], chunk: int = CHUNK_BYTES) -> None:
    """Read ``path`` in ``chunk``-byte reads into one buffer and hand each to ``update``."""
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            update(view[:count])


def blake3_loop(path: Path, threads: int = 1, chunk: int = CHUNK_BYTES) -> str:
    hasher = blake3.blake3(max_threads=threads)
    chunked(path, hasher.update, chunk)
    return hasher.hexdigest()


def sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    chunked(path, hasher.update)
    return hasher.hexdigest()


def read_only(path: Path) -> None:
    chunked(path, lambda chunk: None)


def throughput_rows(path: Path, size_mb: int, repeat: int) -> list[dict[str, Any]]:
    """Median MB/s of each method over ``repeat`` reads of the warm file."""
    if file_digest(path) != blake3_loop(path, blake3.blake3.AUTO, 4 * CHUNK_BYTES):
        raise SystemExit("file_digest disagrees with multi-threaded BLAKE3")
    methods: list[tuple[str, Callable[[], Any]]] = [
        ("file_digest (blake3, 1 thread)", lambda: file_digest(path)),
        ("blake3, AUTO threads", lambda: blake3_loop(path, blake3.blake3.AUTO)),
        ("blake3, AUTO threads, 4 MiB reads",
         lambda: blake3_loop(path, blake3.blake3.AUTO, 4 * CHUNK_BYTES)),
        ("sha256", lambda: sha256(path)),
        ("read only", lambda: read_only(path)),
    ]
    rows = []
    for name, run in methods:
        seconds = timed(run, repeat)
        median = statistics.median(seconds)
        rows.append({"method": name, "seconds_median": median, "mb_per_s": size_mb / median,
                     "seconds": seconds})
    sha_rate = next(r["mb_per_s"] for r in rows if r["method"] == "sha256")
    for row in rows:
        row["vs_sha256"] = row["mb_per_s"] / sha_rate
    return rows


def memo_timing(path: Path, calls: int) -> dict[str, Any]:
    """Microseconds per ``file_digest`` call answered by a warm memo."""
    memo = MemoryHashMemo()
    expected = file_digest(path, memo)
    seconds = timed(lambda: file_digest(path, memo), calls)
    if memo.hits != calls or file_digest(path, memo) != expected:
        raise SystemExit(f"expected {calls} memo hits, got {memo.hits}")
    micros = [s * 1e6 for s in seconds]
    return {"calls": calls, "median_us": statistics.median(micros),
            "p95_us": percentile(micros, 95), "max_us": max(micros)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="file size in MiB")
    parser.add_argument("--repeat", type=int, default=3, help="timed reads per method")
    parser.add_argument("--calls", type=int, default=1000, help="memoised re-hash calls")
    parser.add_argument("--base", help="directory for the temporary file")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    clean_env()
    print(f"machine: {machine()}")
    scratch = Path(tempfile.mkdtemp(prefix="jobcell-bench-hash-", dir=args.base))
    try:
        path = scratch / "input.bin"
        write_random_file(path, args.size_mb)
        read_only(path)  # page-cache warm-up, discarded
        fs = filesystem(scratch)
        print(f"file: {args.size_mb} MiB on {fs}, {args.repeat} timed reads each, medians")
        rows = throughput_rows(path, args.size_mb, args.repeat)
        memo = memo_timing(path, args.calls)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{'method':<36}  {'MB/s':>8}  {'median s':>8}  {'vs sha256':>9}")
    for row in rows:
        print(f"{row['method']:<36}  {row['mb_per_s']:>8.0f}  {row['seconds_median']:>8.3f}  "
              f"{row['vs_sha256']:>8.2f}x")
    print(f"memoised re-hash (MemoryHashMemo, {memo['calls']} calls): median "
          f"{memo['median_us']:.1f} µs, p95 {memo['p95_us']:.1f} µs, max {memo['max_us']:.1f} µs")
    targets = [{"name": "memoised file_digest re-hash", "value": memo["median_us"],
                "unit": "µs", "target": f"< {TARGET_MEMO_US:g} µs",
                "passed": memo["median_us"] < TARGET_MEMO_US}]
    emit({"benchmark": "hashing", "machine": machine(), "size_mb": args.size_mb,
          "filesystem": fs, "rows": rows, "memo": memo, "targets": targets}, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
