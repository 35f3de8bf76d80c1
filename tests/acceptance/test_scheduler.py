"""The scheduler as a user sees it: capabilities, scheduler status, gc, GPU refusals."""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from unit.fake_trees import fake_nvidia_smi

from .helpers import Cli, assert_clean_error, write_spec

GC_AGE_DAYS = "0.00001"     # 0.864 s

WRITER_SPEC = """\
    label: retention
    steps:
      - id: write
        runner: writer
"""


def add_runner(cli: Cli, name: str, text: str) -> None:
    (cli.home / "runners" / f"{name}.yaml").write_text(textwrap.dedent(text), encoding="utf-8")


def on_fake_gpu_host(cli: Cli, monkeypatch: pytest.MonkeyPatch, bin_dir: Path) -> None:
    """The CLI (and the worker it starts) sees two GPUs through a fake nvidia-smi."""
    fake_nvidia_smi(bin_dir)
    for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    cli.env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def finished_job(cli: Cli, folder: Path) -> dict[str, Any]:
    """Submit the writer spec, wait for it, then let it age past :data:`GC_AGE_DAYS`."""
    done = cli.json("submit", str(write_spec(folder, "spec.yaml", WRITER_SPEC)), "--wait")
    assert done["state"] == "succeeded", done
    time.sleep(float(GC_AGE_DAYS) * 86400 + 0.2)
    return done


def test_capabilities_show_each_figure_with_its_source(
        cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with (cli.home / "jobcell.toml").open("a", encoding="utf-8") as config:
        config.write("cpu_slots = 3\n")
    on_fake_gpu_host(cli, monkeypatch, tmp_path / "bin")
    answers = cli.run_many({"json": ["capabilities", "--json"], "human": ["capabilities"]})

    caps = answers["json"].json
    assert answers["json"].returncode == 0, str(answers["json"])
    assert (caps["cpu_slots"], caps["gpu_count"]) == (3, 2), caps
    assert "option cpu_slots" in caps["cpu_source"]
    assert caps["memory_mb"] > 0 and caps["memory_source"], caps
    assert "nvidia-smi" in caps["gpu_source"]
    assert [(g["index"], g["name"]) for g in caps["gpus"]] == [
        ("0", "NVIDIA H100 80GB HBM3"), ("1", "NVIDIA A100-PCIE-40GB")]

    human = answers["human"]
    assert human.returncode == 0 and "Traceback" not in human.stderr, str(human)
    for text in ("cpu_slots", "cpu_source", "memory_mb", "memory_source", "gpu_count",
                 "gpu_source", "option cpu_slots", "NVIDIA H100 80GB HBM3"):
        assert text in human.stdout, f"{text!r} missing\n{human}"


def test_gc_dry_run_reports_then_gc_removes_old_jobs(cli: Cli, tmp_path: Path) -> None:
    job_id = finished_job(cli, tmp_path)["job_id"]
    answers = cli.run_many({
        "dry": ["gc", "--older-than", GC_AGE_DAYS, "--dry-run", "--json"],
        "dry-human": ["gc", "--older-than", GC_AGE_DAYS, "--dry-run"],
        "negative": ["gc", "--older-than", "-1"],
        "nan": ["gc", "--older-than", "nan", "--json"]})
    dry = answers["dry"].json
    assert (dry["dry_run"], dry["jobs_removed"], dry["job_ids"]) == (True, 1, [job_id]), dry
    assert dry["older_than_days"] == float(GC_AGE_DAYS) and dry["bytes_freed"] > 0
    assert "would remove 1 job(s)" in answers["dry-human"].stdout, str(answers["dry-human"])
    for name in ("negative", "nan"):
        assert_clean_error(answers[name], "--older-than", "non-negative")
    assert cli.json("status", job_id)["state"] == "succeeded"   # nothing was removed yet

    removed = cli.json("gc", "--older-than", GC_AGE_DAYS)
    assert (removed["dry_run"], removed["jobs_removed"], removed["job_ids"]) == (
        False, 1, [job_id]), removed
    assert not (cli.home / "artifacts" / job_id).exists()
    assert_clean_error(cli.run("status", job_id), job_id)


def test_gc_older_than_zero_removes_every_finished_job(cli: Cli, tmp_path: Path) -> None:
    job_id = finished_job(cli, tmp_path)["job_id"]
    removed = cli.json("gc", "--older-than", "0")
    assert (removed["jobs_removed"], removed["job_ids"]) == (1, [job_id]), removed


def test_scheduler_status_shows_the_cooldown_after_an_oom_like_exit(cli: Cli,
                                                                    tmp_path: Path) -> None:
    add_runner(cli, "hog", """\
        name: hog
        command: sh
        args_template: ["-c", "kill -9 $$"]
        concurrency_group: big-memory
        resources: {memory_mb: 64, cpu_slots: 1, timeout_s: 60}
    """)
    spec = write_spec(tmp_path, "hog.yaml", "label: oom\nsteps:\n  - runner: hog\n")
    failed = cli.run("submit", str(spec), "--wait", "--json")
    assert failed.returncode == 1 and failed.json["steps"][0]["exit_code"] == 137, str(failed)
    answers = cli.run_many({"json": ["scheduler", "status", "--json"],
                            "human": ["scheduler", "status"]})

    cooldowns = answers["json"].json["cooldowns"]
    assert [(c["group"], c["phase"], c["throttle_max"]) for c in cooldowns] == [
        ("big-memory", "cooldown", 1)], cooldowns
    assert "OOM-like exit" in cooldowns[0]["reason"]
    assert cooldowns[0]["since"] < cooldowns[0]["cooldown_until"] < cooldowns[0][
        "throttle_until"]
    human = answers["human"]
    assert human.returncode == 0 and "Traceback" not in human.stderr, str(human)
    assert "cooldowns and throttles" in human.stdout, str(human)
    row = [line for line in human.stdout.splitlines() if "big-memory" in line]
    assert len(row) == 1 and "cooldown" in row[0], str(human)
    assert cooldowns[0]["cooldown_until"] in human.stdout


def test_submit_refuses_a_node_that_needs_more_gpus_than_the_cell_has(
        cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    on_fake_gpu_host(cli, monkeypatch, tmp_path / "bin")
    add_runner(cli, "trainer", """\
        name: trainer
        command: sh
        args_template: ["-c", "true"]
        resources: {memory_mb: 64, cpu_slots: 1, gpus: 3}
    """)
    spec = write_spec(tmp_path, "train.yaml", """\
        label: gpu
        pipeline:
          - {id: fit-model, runner: trainer}
    """)
    message = assert_clean_error(cli.run("submit", str(spec), "--json"), "'fit-model'",
                                 "'trainer'", "GPU")
    assert "3" in message and "2" in message, message
    assert cli.json("list") == []
