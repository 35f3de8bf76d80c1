"""Run every benchmark and print a summary table with PASS/MISS against each target.

    .venv/bin/python benchmarks/run_all.py [--quick] [--base DIR] [--json-out FILE]

Each benchmark runs as its own process (so one cannot warm caches for another)
and hands its figures back as JSON. ``--quick`` runs smaller versions (for a
smoke check; its figures are not the issue's targets).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def plans(quick: bool, base: str | None) -> list[tuple[str, list[str]]]:
    where = ["--base", base] if base else []
    if quick:
        return [
            ("bench_throughput.py", ["--jobs", "200", "--slots", "8", "--repeat", "1", *where]),
            ("bench_submit.py", ["--batches", "1000", "--repeat", "1", "--preload", "5000",
                                 *where]),
            ("bench_query.py", ["--jobs", "10000", "--repeat", "50", "--cli-repeat", "3",
                                *where]),
            ("bench_admission.py", ["--jobs", "20000", "--rounds", "20", *where]),
            ("bench_cache_latency.py", ["--submissions", "10", *where]),
            ("bench_hashing.py", ["--size-mb", "64", "--repeat", "1", "--calls", "200",
                                  *where]),
            ("bench_slurm.py", ["--steps", "30", *where]),
            ("bench_http.py", ["--jobs", "10000", "--requests", "500", "--warmup", "50",
                               *where]),
            ("bench_client.py", ["--tasks", "100", "--hits", "300", *where]),
        ]
    return [
        ("bench_throughput.py", ["--slots", "8", "16", *where]),
        ("bench_submit.py", where),
        ("bench_query.py", where),
        ("bench_admission.py", where),
        ("bench_cache_latency.py", where),
        ("bench_hashing.py", where),
        ("bench_slurm.py", where),
        ("bench_http.py", where),
        ("bench_client.py", where),
    ]


def fmt(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value:.1%}"
    number = f"{value:,.2f}" if value < 10 else f"{value:,.0f}"
    return f"{number} {unit}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--base", help="directory for the temporary cell homes")
    parser.add_argument("--json-out", help="write every benchmark's figures here")
    args = parser.parse_args(argv)
    results: list[dict[str, Any]] = []
    failures = []
    with tempfile.TemporaryDirectory(prefix="jobcell-bench-results-") as tmp:
        for script, extra in plans(args.quick, args.base):
            out = Path(tmp) / f"{script}.json"
            print(f"\n=== {script} {' '.join(extra)}", flush=True)
            begin = time.perf_counter()
            done = subprocess.run([sys.executable, str(HERE / script), *extra,
                                   "--json-out", str(out)], check=False)
            print(f"--- {script}: {time.perf_counter() - begin:.0f} s, exit {done.returncode}")
            if done.returncode != 0 or not out.exists():
                failures.append(script)
                continue
            results.append(json.loads(out.read_text()))
    rows = [(t["name"], fmt(t["value"], t.get("unit", "")), t["target"],
             "PASS" if t["passed"] else "MISS") for r in results for t in r["targets"]]
    rows += [(f"{script} did not finish", "-", "-", "ERROR") for script in failures]
    header = ("target", "measured", "goal", "result")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    print("\nSummary" + (" (--quick: smaller runs, not the issue's figures)" if args.quick
                         else ""))
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
