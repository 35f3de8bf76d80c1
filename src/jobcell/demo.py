"""The demo: example runners, a small DAG pipeline, progress, results, dedup and the
step cache."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from jobcell.cli_output import console, progress_bar, show_status
from jobcell.examples.demo_steps import summarise
from jobcell.service import Cell


def _install_example_runners(cell: Cell) -> list[str]:
    """Copy the YAML runners into the cell's registry folder; register the Python one."""
    source = resources.files("jobcell.examples") / "runners"
    for entry in source.iterdir():
        if entry.name.endswith((".yaml", ".py")):
            with resources.as_file(entry) as path:
                shutil.copy2(path, cell.home.runners / entry.name)
    cell.registry.refresh()
    cell.register_runner(summarise, version="1.0", resources={"memory_mb": 128, "cpu_slots": 1},
                         params={"top": {"type": "integer", "default": 5, "minimum": 1}},
                         outputs=["report.md"])
    return sorted(cell.runners())


def _pipeline(lines: int) -> dict[str, Any]:
    text = (resources.files("jobcell.examples") / "demo_pipeline.yaml").read_text("utf-8")
    spec = yaml.safe_load(text)
    for node in spec["pipeline"]:
        if node["runner"] == "make_text":
            node["params"]["lines"] = lines
    return spec


def _show_result(cell: Cell, job_id: str) -> None:
    value = cell.result(job_id)["result"] or {}
    console.print(f"\n[bold]Result[/bold] (value returned by the 'report' step): "
                  f"{value.get('total_words')} words, {value.get('distinct')} distinct, "
                  f"from {', '.join(value.get('sources', []))}")
    for item in value.get("top", []):
        console.print(f"  {item['word']:<10} {item['count']}")
    console.print(f"\n[bold]Output files[/bold] (under {cell.home.root}):")
    for out in cell.outputs(job_id):
        relative = Path(out["path"]).relative_to(cell.home.root)
        console.print(f"  {out['size']:>7} B  blake3 {out['blake3'][:12]}  {relative}",
                      soft_wrap=True)


def run_demo(home: Path | None, lines: int) -> int:
    """Run the demo; returns the process exit code."""
    root = home or Path(tempfile.mkdtemp(prefix="jobcell-demo-"))
    with Cell(root) as cell:
        console.print(f"[bold]jobcell demo[/bold] - cell home: {cell.home.root}")
        caps = cell.capabilities()
        console.print(f"capacity: {caps['cpu_slots']} cpu slots ({caps['cpu_source']}), "
                      f"{caps['memory_mb']} MB memory, {caps['gpu_count']} GPU(s) "
                      f"({caps['gpu_source']}); executor: {caps['executor_backend']}")
        console.print("registered runners: " + ", ".join(_install_example_runners(cell)))
        spec = _pipeline(lines)
        console.print("\nsubmitting a pipeline: make_a, make_b -> count_a, count_b -> report")
        started = time.time()
        first = cell.submit(spec)
        console.print(f"job {first.job_id} queued; the embedded worker was started on demand "
                      f"(pid {cell.worker_status()['pid']})")
        with progress_bar(enabled=sys.stderr.isatty()) as update:
            status = cell.wait(first.job_id, timeout_s=300, on_progress=update)
        show_status(status)
        console.print(f"finished in {time.time() - started:.1f} s")
        if status["state"] != "succeeded":
            console.print("[red]the demo pipeline did not succeed[/red]; see the logs with "
                          f"jobcell logs {first.job_id} --home {cell.home.root}")
            return 1
        _show_result(cell, first.job_id)
        again = cell.submit(spec)
        same = "the same job" if again.job_id == first.job_id else "a different job"
        console.print(f"\nsubmitting the identical pipeline again -> {same} {again.job_id}, "
                      f"deduplicated={again.deduplicated} (whole-job dedup by spec_hash: "
                      "nothing was re-run)")
        cached_ok = _show_step_cache(cell, spec)
        console.print(f"\nexplore it: jobcell status {first.job_id} --home {cell.home.root}\n"
                      f"            jobcell events {first.job_id} --home {cell.home.root}\n"
                      f"            jobcell logs {first.job_id} --home {cell.home.root}")
        cell.stop_worker()
        return 0 if again.deduplicated and again.job_id == first.job_id and cached_ok else 1


def _show_step_cache(cell: Cell, spec: dict[str, Any]) -> bool:
    """Submit the pipeline with only the report changed: every other step is a cache hit."""
    variant = {**spec, "pipeline": [
        {**node, "params": {**node.get("params", {}), "top": 3}} if node["id"] == "report"
        else node for node in spec["pipeline"]]}
    console.print("\nsubmitting the pipeline with only the report changed (top: 3): the "
                  "step cache serves every unchanged step from the first job")
    started = time.time()
    job = cell.submit(variant)
    status = cell.wait(job.job_id, timeout_s=300)
    states = {step["id"]: step["state"] for step in status["steps"]}
    for step_id, state in states.items():
        source = next((e for e in cell.events(job.job_id)
                       if e["kind"] == "step_cached" and e["step"] == step_id), None)
        how = (f"copied from {source['source_job']}/{source['source_step']}" if source
               else "ran")
        console.print(f"  {step_id:<8} {state:<10} {how}")
    console.print(f"finished in {time.time() - started:.1f} s")
    unchanged = [step for step in states if step != "report"]
    return (status["state"] == "succeeded" and states["report"] == "succeeded"
            and all(states[step] == "cached" for step in unchanged))
