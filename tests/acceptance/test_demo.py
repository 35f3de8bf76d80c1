"""`jobcell demo`: the README's first command, run as a user would (no terminal)."""

from __future__ import annotations

import re
from pathlib import Path

from .helpers import Cli


def test_demo(bare_cli: Cli) -> None:
    demo = bare_cli.run("demo", timeout=120)
    assert demo.returncode == 0, str(demo)
    assert "Traceback" not in demo.stderr
    out = demo.stdout
    assert str(bare_cli.home) in out
    assert "registered runners: make_text, summarise, word_count" in out
    assert re.search(r"Result.*\d+ words, \d+ distinct", out), out
    for name in ("text.txt", "counts.json", "report.md"):
        assert name in out, name
    assert "deduplicated=True" in out
    assert "the same job" in out
    # No terminal: no live progress bar, no cursor control.
    assert "\x1b[" not in out + demo.stderr
    assert not re.search(r"\b\d+/5\b", out + demo.stderr)

    # The variant with only the report changed: the other four steps are cache hits.
    variant, job = bare_cli.json("list")          # newest first
    assert variant["state"] == "succeeded" and job["state"] == "succeeded"
    assert job["label"] == "demo"
    assert job["job_id"] in out
    assert len(re.findall(rf"cached +copied from {job['job_id']}/", out)) == 4, out
    variant_steps = {s["id"]: s["state"] for s in bare_cli.json("status", variant["job_id"])
                     ["steps"]}
    assert variant_steps == {"make_a": "cached", "make_b": "cached", "count_a": "cached",
                             "count_b": "cached", "report": "succeeded"}
    status = bare_cli.json("status", job["job_id"])
    assert len(status["steps"]) == 5
    assert {s["state"] for s in status["steps"]} == {"succeeded"}
    assert {s["id"] for s in status["steps"]} == {"make_a", "make_b", "count_a", "count_b",
                                                  "report"}
    outputs = bare_cli.json("outputs", job["job_id"])
    assert {o["name"] for o in outputs} >= {"text.txt", "counts.json", "report.md"}
    assert all(Path(o["path"]).is_file() for o in outputs)
    result = bare_cli.json("result", job["job_id"])["result"]
    assert result["sources"] == ["count_a", "count_b"] and result["total_words"] > 0
    # The two generators ran in parallel (when the cell has two slots or more).
    slots = re.search(r"capacity: (\d+) cpu slots", out)
    assert slots, out
    if int(slots.group(1)) >= 2:
        steps = {s["id"]: s for s in status["steps"]}
        assert steps["make_a"]["started_at"] < steps["make_b"]["finished_at"]
        assert steps["make_b"]["started_at"] < steps["make_a"]["finished_at"]
    # The demo stops the worker it started.
    assert bare_cli.json("worker", "status")["alive"] is False
