"""Scheduler policies on a real cell: OOM cooldowns, fair share, GPU leases, retention.

Each test runs real step processes under a real worker (a daemon where the test watches
it work) on a real SQLite cell.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from integration_support import events_of, run_worker, wait_for
from scheduler_support import (
    all_finished,
    fake_gpu_host,
    overlapping_pairs,
    overlaps,
    probe_saw,
    register_probe,
    register_sh,
    step_interval,
    step_state,
)

from jobcell import retention
from jobcell.errors import NotFoundError, SpecError
from jobcell.service import Cell, iso

# -- OOM: cooldown, throttle, more memory ---------------------------------------------------

OOM_SETTINGS = {"oom_cooldown_s": 1.5, "oom_throttle_hours": 0.002,   # throttled for 7.2 s
                "oom_throttle_max_concurrent": 1, "oom_memory_factor": 1.5}


def test_oom_like_exit_cools_the_group_down_then_throttles_it(
        make_cell: Callable[..., Cell]) -> None:
    cell = make_cell(**OOM_SETTINGS)
    # Killed like the kernel's OOM killer does (exit 137) on attempt 1, fine on attempt 2.
    register_sh(cell, "hog", 'if [ "$JOBCELL_ATTEMPT" = 1 ]; then kill -9 $$; fi',
                concurrency_group="heavy", retries=1,
                resources={"cpu_slots": 1, "memory_mb": 100})
    register_sh(cell, "sibling", "sleep 0.8", concurrency_group="heavy",
                resources={"cpu_slots": 1, "memory_mb": 10})
    register_sh(cell, "bystander", "sleep 0.8", resources={"cpu_slots": 1, "memory_mb": 10})
    hog = cell.submit({"label": "oom", "steps": [{"runner": "hog"}]}).job_id
    cell.ensure_worker()

    cooled = wait_for(lambda: events_of(cell, hog, "oom_cooldown"), 15, "the OOM cooldown")[0]
    state = cell.scheduler_status()
    assert time.time() < cooled["cooldown_until"], "the test was too slow to see the cooldown"
    assert cooled["group"] == "heavy" and cooled["exit_code"] == 137
    assert cooled["throttle_until"] == pytest.approx(cooled["cooldown_until"] + 7.2)
    assert [(c["group"], c["phase"], c["cooldown_until"], c["throttle_until"],
             c["throttle_max"]) for c in state["cooldowns"]] == [
        ("heavy", "cooldown", iso(cooled["cooldown_until"]), iso(cooled["throttle_until"]), 1)]

    # Submitted during the cooldown: the siblings wait for it, then run one at a time.
    others = cell.submit_many([{"label": "oom", "cache": False, "steps": [{"runner": name}]}
                               for name in ["sibling"] * 3 + ["bystander"] * 2])
    siblings, bystanders = [r.job_id for r in others[:3]], [r.job_id for r in others[3:]]
    wait_for(lambda: all_finished(cell, [hog, *siblings, *bystanders]), 30, "every job")
    throttled = cell.scheduler_status()["cooldowns"]
    assert time.time() < cooled["throttle_until"], "the test was too slow to see the throttle"
    assert [(c["group"], c["phase"]) for c in throttled] == [("heavy", "throttled")]

    assert cell.status(hog)["state"] == "succeeded"
    first, second = cell.store.attempts(hog)
    assert (first.exit_code, second.exit_code) == (137, 0)
    assert second.started_at >= first.finished_at + 1.5 - 1e-6, "retried during the cooldown"
    assert (first.memory_mb, second.memory_mb) == (100, 150)
    raised = events_of(cell, hog, "memory_raised")
    assert [(e["from_mb"], e["to_mb"], e["attempt"]) for e in raised] == [(100, 150, 2)]

    heavy = {"hog": step_interval(cell, hog)}
    heavy.update({f"sibling{i}": step_interval(cell, job) for i, job in enumerate(siblings)})
    assert all(start >= cooled["cooldown_until"] for start, _ in heavy.values()), heavy
    assert all(end < cooled["throttle_until"] for _, end in heavy.values()), heavy
    assert overlapping_pairs(heavy) == [], f"the throttled group ran concurrently: {heavy}"
    # Another group is neither blocked by the cooldown nor held to one at a time.
    calm = [step_interval(cell, job) for job in bystanders]
    assert all(start < cooled["cooldown_until"] for start, _ in calm), calm
    assert overlaps(*calm), calm


# -- fair share between owners --------------------------------------------------------------

# One slot: the backlog owner has nothing running whenever the slot frees, so only turn
# keeping lets the other owner in; two slots: the backlog owner still has one running.
@pytest.mark.parametrize("cpu_slots", [1, 2])
def test_one_owner_backlog_does_not_starve_another_owner(make_cell: Callable[..., Cell],
                                                         cpu_slots: int) -> None:
    cell = make_cell(cpu_slots=cpu_slots)
    register_sh(cell, "step", "sleep 0.2", resources={"cpu_slots": 1, "memory_mb": 10})
    spec = {"label": "fair", "cache": False, "steps": [{"runner": "step"}]}
    alice = [r.job_id for r in cell.submit_many([spec] * 30, owner="alice")]
    cell.ensure_worker()
    wait_for(lambda: step_state(cell, alice[0], "0-step") != "queued", 15, "alice's first step")
    submitted = time.time()
    bob = cell.submit(spec, owner="bob").job_id
    wait_for(lambda: cell.status(bob)["state"] == "succeeded", 15, "bob's job")

    bob_start = step_interval(cell, bob)[0]
    starts = [rows[0].started_at for job in alice if (rows := cell.store.attempts(job))]
    jumped = [start for start in starts if submitted <= start < bob_start]
    assert len(jumped) <= 2, (f"{len(jumped)} of alice's steps started after bob submitted "
                              "and before bob's step")
    assert len(starts) < 30      # bob did not wait for alice's backlog


# -- GPU devices ----------------------------------------------------------------------------

def _devices_seen(cell: Cell, jobs: dict[str, str], count: int) -> dict[str, str] | None:
    """The devices the probes of ``jobs`` saw, once at least ``count`` of them ran."""
    seen = {name: devices[0] for name, job in jobs.items()
            if (devices := probe_saw(cell, job, "train"))}
    return seen if len(seen) >= count else None


def test_gpu_steps_lease_distinct_devices_and_wait_for_a_free_one(
        make_cell: Callable[..., Cell], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_gpu_host(monkeypatch, tmp_path / "bin")
    cell = make_cell()
    register_probe(cell, "one-gpu", gpus=1)
    gates = {name: tmp_path / f"gate-{name}" for name in "abc"}
    specs = [{"label": "gpu", "pipeline": [{"id": "train", "runner": "one-gpu",
                                            "params": {"gate": str(gate)}}]}
             for gate in gates.values()]
    jobs = dict(zip(gates, (r.job_id for r in cell.submit_many(specs)), strict=True))
    cell.ensure_worker()
    try:
        seen = wait_for(lambda: _devices_seen(cell, jobs, 2), 15, "two GPU steps to run")
        assert sorted(seen.values()) == ["0", "1"], seen
        state = cell.scheduler_status()
        assert state["capacity"]["gpus"] == ["0", "1"]
        assert state["used"]["gpus"] == ["0", "1"] and state["free"]["gpus"] == []
        assert sorted(lease["gpus"][0] for lease in state["leases"]) == ["0", "1"]
        assert all(len(lease["gpus"]) == 1 for lease in state["leases"]), state["leases"]
        (third,) = set(jobs) - set(seen)
        time.sleep(0.5)     # ten polls of the worker: the third step must still wait
        assert step_state(cell, jobs[third], "train") == "queued"

        first = min(seen)
        gates[first].touch()
        freed = wait_for(lambda: probe_saw(cell, jobs[third], "train"), 15, "the third step")
        assert freed == (seen[first], seen[first])
    finally:
        for gate in gates.values():
            gate.touch()
    wait_for(lambda: all_finished(cell, jobs.values()), 15, "the GPU jobs")
    assert {cell.status(job)["state"] for job in jobs.values()} == {"succeeded"}


def test_gpu_cell_hides_devices_from_cpu_steps_and_lends_optional_ones(
        make_cell: Callable[..., Cell], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_gpu_host(monkeypatch, tmp_path / "bin")
    cell = make_cell()
    register_probe(cell, "cpu-only")
    register_probe(cell, "greedy", optional_gpus=2)
    cpu = cell.submit({"label": "gpu", "steps": [{"runner": "cpu-only"}]}).job_id
    greedy = cell.submit({"label": "gpu", "steps": [{"runner": "greedy"}]}).job_id
    run_worker(cell)
    assert probe_saw(cell, cpu, "0-cpu-only") == ("", "")
    assert probe_saw(cell, greedy, "0-greedy") == ("0,1", "0,1")
    started = events_of(cell, greedy, "step_started")
    assert [e.get("gpus") for e in started] == [["0", "1"]]


def test_visible_devices_narrow_the_cell_and_too_many_gpus_are_refused(
        make_cell: Callable[..., Cell], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_gpu_host(monkeypatch, tmp_path / "bin")
    full = make_cell("full")
    register_probe(full, "trainer", gpus=3)
    with pytest.raises(SpecError) as caught:
        full.submit({"label": "gpu", "pipeline": [{"id": "fit", "runner": "trainer"}]})
    assert "'fit'" in str(caught.value) and "needs 3 GPU(s) but the cell has 2" in str(
        caught.value)
    assert full.store.count_jobs() == 0

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    narrowed = make_cell("narrowed")
    caps = narrowed.capabilities()
    assert [gpu["index"] for gpu in caps["gpus"]] == ["1"], caps
    assert "CUDA_VISIBLE_DEVICES=1" in caps["gpu_source"]
    register_probe(narrowed, "one-gpu", gpus=1)
    job = narrowed.submit({"label": "gpu", "steps": [{"runner": "one-gpu"}]}).job_id
    run_worker(narrowed)
    assert narrowed.status(job)["state"] == "succeeded"
    assert probe_saw(narrowed, job, "0-one-gpu") == ("1", "1")


def test_gpu_count_zero_leaves_the_cell_without_gpus(
        make_cell: Callable[..., Cell], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_gpu_host(monkeypatch, tmp_path / "bin")
    cell = make_cell(gpu_count=0)
    caps = cell.capabilities()
    assert (caps["gpu_count"], caps["gpus"]) == (0, []), caps
    assert "gpu_count" in caps["gpu_source"]
    assert cell.scheduler_status()["capacity"]["gpus"] == []
    register_probe(cell, "one-gpu", gpus=1)
    with pytest.raises(SpecError, match="GPU"):
        cell.submit({"label": "gpu", "steps": [{"runner": "one-gpu"}]})


# -- garbage collection ---------------------------------------------------------------------

GC_AGE_DAYS = 0.00001    # 0.864 s


def _submit_quick_jobs(cell: Cell, count: int) -> list[str]:
    register_sh(cell, "quick", 'echo done > "$1/done.txt"', "{output_dir}",
                resources={"cpu_slots": 1, "memory_mb": 10})
    return [r.job_id for r in cell.submit_many(
        [{"label": "gc", "cache": False, "steps": [{"runner": "quick"}]}] * count)]


def test_gc_removes_old_finished_jobs_and_orphans_but_never_live_ones(
        make_cell: Callable[..., Cell], tmp_path: Path) -> None:
    cell = make_cell(gc_max_age_days=GC_AGE_DAYS, gc_interval_s=0)
    old = _submit_quick_jobs(cell, 2)
    gate = tmp_path / "gate"
    register_sh(cell, "held", 'while [ ! -e "$1" ]; do sleep 0.02; done', "{gate}",
                concurrency_group="held", max_concurrent=1,
                params={"gate": {"type": "string"}, "n": {"type": "integer"}},
                resources={"cpu_slots": 1, "memory_mb": 10})
    running, queued = (cell.submit({"label": "gc", "steps": [
        {"runner": "held", "params": {"gate": str(gate), "n": n}}]}).job_id for n in (1, 2))
    cell.ensure_worker()
    try:
        wait_for(lambda: all_finished(cell, old), 15, "the quick jobs")
        wait_for(lambda: cell.status(running)["state"] == "running", 15, "the held job")
        orphan = cell.home.artifacts / "no-such-job" / "step" / "attempt-1"
        orphan.mkdir(parents=True)
        (orphan / "stdout").write_text("left behind by an interrupted collection\n")
        time.sleep(GC_AGE_DAYS * 86400 + 0.2)
        sizes = {job: retention.tree_size(cell.home.artifacts / job) for job in old}

        dry = cell.gc(dry_run=True)
        assert dry["dry_run"] is True and sorted(dry["job_ids"]) == sorted(old), dry
        orphan_bytes = len("left behind by an interrupted collection\n")
        assert dry["jobs_removed"] == 2 and dry["orphan_dirs"] == ["no-such-job"]
        assert dry["bytes_freed"] == sum(sizes.values()) + orphan_bytes
        assert all(cell.status(job)["state"] == "succeeded" for job in old)
        assert all((cell.home.artifacts / job).is_dir() for job in old)
        assert orphan.is_dir()

        removed = cell.gc()
        assert sorted(removed["job_ids"]) == sorted(old), removed
        assert removed["orphan_dirs_removed"] == 1 and not orphan.parent.parent.exists()
        assert removed["older_than_days"] == GC_AGE_DAYS and removed["dry_run"] is False
        for job in old:
            with pytest.raises(NotFoundError):
                cell.status(job)
            assert not (cell.home.artifacts / job).exists()
            assert cell.store.attempts(job) == [] and cell.store.events(job) == []
        assert cell.status(running)["state"] == "running"
        assert cell.status(queued)["state"] == "queued"
        assert (cell.home.artifacts / running).is_dir()
    finally:
        gate.touch()
    wait_for(lambda: all_finished(cell, [running, queued]), 15, "the held jobs")


def test_gc_dry_run_reports_every_old_job_beyond_one_batch(
        make_cell: Callable[..., Cell], monkeypatch: pytest.MonkeyPatch) -> None:
    cell = make_cell(gc_max_age_days=GC_AGE_DAYS, gc_interval_s=0)
    _submit_quick_jobs(cell, 3)
    run_worker(cell)
    time.sleep(GC_AGE_DAYS * 86400 + 0.2)
    monkeypatch.setattr(retention, "BATCH", 2)     # stands in for more than 500 old jobs
    assert cell.gc(dry_run=True)["jobs_removed"] == 3
    assert cell.gc()["jobs_removed"] == 3


def test_gc_dry_run_reports_orphaned_artifact_folders(make_cell: Callable[..., Cell]) -> None:
    cell = make_cell(gc_interval_s=0)
    orphan = cell.home.artifacts / "no-such-job"
    orphan.mkdir(parents=True)
    assert cell.gc(dry_run=True)["orphan_dirs_removed"] == 1
    assert orphan.is_dir()


def test_worker_collects_old_jobs_on_its_own(make_cell: Callable[..., Cell]) -> None:
    cell = make_cell(gc_max_age_days=GC_AGE_DAYS, gc_interval_s=0.5)
    (job,) = _submit_quick_jobs(cell, 1)
    cell.ensure_worker()
    wait_for(lambda: cell.status(job)["state"] == "succeeded", 15, "the job")
    folder = cell.home.artifacts / job
    assert folder.is_dir()

    def gone() -> bool:
        try:
            cell.status(job)
        except NotFoundError:
            return not folder.exists()     # rows go first, then files
        return False

    wait_for(gone, 10, "the worker's periodic collection")
    assert cell.worker_status()["alive"] is True
