"""Garbage collection: terminal jobs older than the retention age, with their artifacts.

Rows go first, then files: a crash in between leaves an artifact directory that no
job refers to, and the next collection removes it. Live jobs are never touched (the
store refuses to delete a job that is not terminal).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from jobcell.home import CellHome
from jobcell.store import Store

BATCH = 500


@dataclass
class GcReport:
    """What a collection removed (or, in a dry run, would remove)."""

    jobs: list[str] = field(default_factory=list)
    orphan_dirs: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    dry_run: bool = False
    more: bool = False       # stopped after ``max_batches``: more old jobs are left

    def to_dict(self) -> dict[str, object]:
        return {"jobs_removed": len(self.jobs), "job_ids": self.jobs,
                "orphan_dirs_removed": len(self.orphan_dirs), "orphan_dirs": self.orphan_dirs,
                "bytes_freed": self.bytes_freed,
                "dry_run": self.dry_run}


def tree_size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (hard links counted once each)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if st.st_nlink == 1:
                total += st.st_size
    return total


def collect(home: CellHome, store: Store, max_age_days: float | None, now: float, *,
            dry_run: bool = False, max_batches: int | None = None) -> GcReport:
    """Remove terminal jobs that finished more than ``max_age_days`` ago (None: keep them
    all; 0: every finished job), and artifact folders whose job is gone.

    With ``max_batches`` (the worker) at most that many batches of ``BATCH`` jobs go
    per call, so a long backlog never holds up a scheduling round; ``more`` then says
    to call again. Orphaned folders are looked for once the backlog is done.
    """
    report = GcReport(dry_run=dry_run)
    cutoff = None if max_age_days is None else now - max_age_days * 86400.0
    if cutoff is not None and dry_run:
        report.jobs = store.terminal_jobs_before(cutoff, 2**62)
        report.bytes_freed = sum(tree_size(home.artifacts / j) for j in report.jobs)
    elif cutoff is not None:
        batches = 0
        while batch := store.terminal_jobs_before(cutoff, BATCH):
            if max_batches is not None and batches == max_batches:
                report.more = True
                return report
            batches += 1
            report.bytes_freed += sum(tree_size(home.artifacts / j) for j in batch)
            report.jobs.extend(batch)
            store.delete_jobs(batch)
            for job_id in batch:
                _remove_artifacts(home, store, job_id)
    report.orphan_dirs = _orphans(home, store, report, remove=not dry_run)
    return report


def _remove_artifacts(home: CellHome, store: Store, job_id: str) -> None:
    shutil.rmtree(home.artifacts / job_id, ignore_errors=True)
    store.forget_file_hashes(f"{home.artifacts / job_id}{os.sep}")


def _orphans(home: CellHome, store: Store, report: GcReport, remove: bool) -> list[str]:
    """Artifact directories whose job is gone (a collection interrupted after the rows).

    Attempt directories are created only by the worker, after their job's row was
    committed, so a directory without a row was left behind by a deletion.
    """
    found: list[str] = []
    collected = set(report.jobs)
    try:
        entries = list(os.scandir(home.artifacts))
    except OSError:
        return found
    for entry in entries:
        if (not entry.is_dir(follow_symlinks=False) or entry.name in collected
                or store.get_job(entry.name, False)):
            continue
        report.bytes_freed += tree_size(Path(entry.path))
        if remove:
            _remove_artifacts(home, store, entry.name)
        found.append(entry.name)
    return found
