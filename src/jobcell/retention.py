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

    def to_dict(self) -> dict[str, object]:
        return {"jobs_removed": len(self.jobs), "job_ids": self.jobs,
                "orphan_dirs_removed": len(self.orphan_dirs), "bytes_freed": self.bytes_freed,
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


def collect(home: CellHome, store: Store, max_age_days: float, now: float, *,
            dry_run: bool = False) -> GcReport:
    """Remove terminal jobs that finished more than ``max_age_days`` ago (0: none)."""
    report = GcReport(dry_run=dry_run)
    if max_age_days > 0:
        cutoff = now - max_age_days * 86400.0
        while True:
            batch = [j for j in store.terminal_jobs_before(cutoff, BATCH)
                     if j not in report.jobs]
            if not batch:
                break
            for job_id in batch:
                report.bytes_freed += tree_size(home.artifacts / job_id)
            report.jobs.extend(batch)
            if dry_run:
                continue
            store.delete_jobs(batch)
            for job_id in batch:
                _remove_artifacts(home, store, job_id)
    if not dry_run:
        report.orphan_dirs = _remove_orphans(home, store, report)
    return report


def _remove_artifacts(home: CellHome, store: Store, job_id: str) -> None:
    shutil.rmtree(home.artifacts / job_id, ignore_errors=True)
    store.forget_file_hashes(f"{home.artifacts / job_id}{os.sep}")


def _remove_orphans(home: CellHome, store: Store, report: GcReport) -> list[str]:
    """Artifact directories whose job is gone (a collection interrupted after the rows).

    Attempt directories are created only by the worker, after their job's row was
    committed, so a directory without a row was left behind by a deletion.
    """
    removed: list[str] = []
    try:
        entries = list(os.scandir(home.artifacts))
    except OSError:
        return removed
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False) or store.get_job(entry.name, False):
            continue
        report.bytes_freed += tree_size(Path(entry.path))
        _remove_artifacts(home, store, entry.name)
        removed.append(entry.name)
    return removed
