"""Review regressions for the task client that need no cell."""

from __future__ import annotations

from pathlib import Path

from jobcell.fileref import FileRef


def test_download_of_a_file_with_a_long_name(tmp_path: Path) -> None:
    """FileRef.download writes to ``mkstemp(prefix=f".{target.name}.")`` first: for a
    legal base name of 246-255 bytes the temporary name is longer than NAME_MAX, so the
    download fails with 'File name too long' (OSError) although the target is fine."""
    name = "r" * 246 + ".txt"                    # 250 bytes: a legal file name
    source = tmp_path / "source" / name
    source.parent.mkdir()
    source.write_text("long name")
    ref = FileRef.local(source)
    (tmp_path / "downloads").mkdir()
    target = ref.download(tmp_path / "downloads")
    assert target.name == name and target.read_text() == "long name"
