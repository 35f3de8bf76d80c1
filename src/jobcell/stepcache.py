"""The worker's side of the step cache: keys for queued steps, twins, materialising hits.

The pure parts (what a step key is made of, how trees are hashed) live in
:mod:`jobcell.cache`; this module connects them to the store and the attempt
directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from jobcell.cache import MemoryHashMemo, file_digest, link_or_copy_tree, step_key, tree_digest
from jobcell.home import CellHome
from jobcell.model.runner import RunnerDefinition
from jobcell.model.states import StepState
from jobcell.store import FileHash, OutputRow, StepRow, Store

CACHE_MARKER = ".cache_source.json"  # written first when an attempt directory is a cache copy
DONE = (StepState.SUCCEEDED, StepState.CACHED)


class StaleTwin(OSError):
    """A finished twin whose outputs can no longer be reused as they were registered."""


class StoreHashMemo:
    """File digests remembered in memory and in the store (so a new worker, or a
    restarted one, does not re-read unchanged inputs)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.memory = MemoryHashMemo()
        self._pending: list[FileHash] = []

    def lookup(self, path: str, size: int, mtime_ns: int, inode: int) -> str | None:
        digest = self.memory.lookup(path, size, mtime_ns, inode)
        if digest is not None:
            return digest
        row = self.store.file_hash(path)
        if row is not None and (row.size, row.mtime_ns, row.inode) == (size, mtime_ns, inode):
            self.memory.record(path, size, mtime_ns, inode, row.blake3)
            return row.blake3
        return None

    def record(self, path: str, size: int, mtime_ns: int, inode: int, digest: str) -> None:
        self.memory.record(path, size, mtime_ns, inode, digest)
        self._pending.append(FileHash(path, size, mtime_ns, inode, digest))

    def remember(self, path: Path, digest: str) -> None:
        """Record a digest computed elsewhere (output registration) for ``path`` as it is."""
        st = path.stat()
        self.record(str(path), st.st_size, st.st_mtime_ns, st.st_ino, digest)

    def flush(self) -> None:
        """Write the digests learnt since the last flush to the store."""
        if self._pending:
            pending, self._pending = self._pending, []
            self.store.record_file_hashes(pending)


class StepCache:
    """Step keys, twin lookup and cache-hit materialisation for one worker."""

    def __init__(self, home: CellHome, store: Store) -> None:
        self.home = home
        self.store = store
        self.memo = StoreHashMemo(store)
        self._keys: dict[tuple[str, str], str] = {}
        self._runner_hashes: dict[str, str] = {}   # definition hash -> cache hash

    def key(self, step: StepRow, runner: RunnerDefinition,
            upstream_attempts: Mapping[str, int]) -> str:
        """The step's content address (computed once per queued step and remembered:
        the outputs it depends on are read-only once their step succeeded).

        Inputs are what the step sees under ``input/``: in the nested layout
        (pipelines) each upstream tree sits under its node id, so that id is part of
        the staged path and of the key; in the flat layout (ordered steps) only the
        contents count. A step without inputs has no layout.
        """
        known = self.known_key(step)
        if known is not None:
            return known
        digests = []
        for up in step.inputs:
            digest = tree_digest(self.output_dir(step.job_id, up, upstream_attempts[up]),
                                 self.memo)
            digests.append(f"{up}/{digest}" if step.input_layout == "nested" else digest)
        # Uploaded files are content-addressed already: their digest is their content.
        digests.extend(f"file:{name}/{digest}" for name, digest in sorted(step.files.items()))
        key = step_key(runner=step.runner, runner_hash=self._cache_hash(step, runner),
                       params=step.params, input_layout=step.input_layout if step.inputs else "",
                       input_digests=digests)
        self.memo.flush()
        self._keys[(step.job_id, step.step_id)] = key
        return key

    def _cache_hash(self, step: StepRow, runner: RunnerDefinition) -> str:
        known = self._runner_hashes.get(step.runner_hash)
        if known is None:
            known = self._runner_hashes[step.runner_hash] = runner.cache_hash()
        return known

    def forget(self, job_id: str, step_id: str) -> None:
        self._keys.pop((job_id, step_id), None)

    def output_dir(self, job_id: str, step_id: str, attempt: int) -> Path:
        return self.home.attempt_dir(job_id, step_id, attempt) / "output"

    def known_key(self, step: StepRow) -> str | None:
        """The step's key when it is already known (no upstream reads needed)."""
        return step.step_key or self._keys.get((step.job_id, step.step_id))

    def done_twins(self, pairs: set[tuple[str, str]]) -> dict[tuple[str, str], StepRow]:
        """Finished twins for many (key, namespace) pairs in one query."""
        return self.store.find_cache_twins(pairs, DONE) if pairs else {}

    def running_twins(self, pairs: set[tuple[str, str]]) -> dict[tuple[str, str], StepRow]:
        """Running twins for many (key, namespace) pairs in one query."""
        return self.store.find_cache_twins(pairs, [StepState.RUNNING]) if pairs else {}

    def done_twin(self, key: str, cache_ns: str) -> StepRow | None:
        return self.done_twins({(key, cache_ns)}).get((key, cache_ns))

    def running_twin(self, key: str, cache_ns: str) -> StepRow | None:
        return self.running_twins({(key, cache_ns)}).get((key, cache_ns))

    def materialise(self, step: StepRow, twin: StepRow, attempt: int) -> list[OutputRow]:
        """Link (or copy) the twin's outputs into ``step``'s attempt ``attempt``.

        The copy must match the twin's registered outputs exactly (names, sizes and
        BLAKE3, checked through the memo, which re-reads a file whose mtime changed):
        a twin whose files were changed in place or are being deleted is no twin.
        Raises :class:`StaleTwin` (an OSError) then. Files first, then the caller
        commits: a crash in between leaves a directory marked as a cache copy, which is
        removed before that attempt is used again.
        """
        rows = [o for o in self.store.outputs(twin.job_id) if o.step_id == twin.step_id]
        root = self.home.attempt_dir(step.job_id, step.step_id, attempt)
        clear_cache_leftover(root)
        building = root.with_name(root.name + ".caching")
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(parents=True)
        try:
            (building / CACHE_MARKER).write_text(json.dumps(
                {"job_id": twin.job_id, "step_id": twin.step_id, "attempt": twin.attempt}),
                encoding="utf-8")
            try:
                link_or_copy_tree(self.output_dir(twin.job_id, twin.step_id, twin.attempt),
                                  building / "output")
            except ValueError as exc:  # a fifo, socket or device among the outputs
                raise StaleTwin(str(exc)) from None
            self._verify(building / "output", rows)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        os.rename(building, root)  # fails, leaving nothing behind, if root is in the way
        target = root / "output"
        copies = [OutputRow(step.job_id, step.step_id, o.name, str(target / o.name), o.size,
                            o.blake3) for o in rows]
        for copy in copies:  # known digests: downstream keys need not read the files again
            with contextlib.suppress(OSError):
                self.memo.remember(Path(copy.path), copy.blake3)
        self.memo.flush()
        return copies

    def _verify(self, output_dir: Path, rows: list[OutputRow]) -> None:
        expected = {o.name: o for o in rows}
        found = {str(path.relative_to(output_dir)) for path in output_dir.rglob("*")
                 if path.is_file() and not path.is_symlink()}
        if found != set(expected):
            raise StaleTwin(f"its files {sorted(found)} are not its registered outputs "
                            f"{sorted(expected)}")
        for name, row in expected.items():
            path = output_dir / name
            if path.stat().st_size != row.size or file_digest(path, self.memo) != row.blake3:
                raise StaleTwin(f"its output {name!r} changed after it was registered")

def clear_cache_leftover(root: Path) -> None:
    """Remove an attempt directory left by a cache copy that was never committed."""
    if (root / CACHE_MARKER).exists():
        shutil.rmtree(root)

