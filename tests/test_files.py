"""Atomic file writes (updater/files.py): a reader sees the old file or the new one, never half."""

from __future__ import annotations

from pathlib import Path

import pytest

from updater.files import atomic_writer, write_file_atomic


def test_atomic_writer_replaces_the_file_when_the_block_ends(tmp_path: Path) -> None:
    target = tmp_path / "root.erofs"
    target.write_bytes(b"old")
    with atomic_writer(target, mode=0o640) as out:
        out.write(b"new ")
        out.write(b"content")
        assert target.read_bytes() == b"old"  # nothing is visible before the rename
    assert target.read_bytes() == b"new content"
    assert target.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["root.erofs"]


def test_an_exception_in_the_block_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "root.erofs"
    target.write_bytes(b"old")
    with pytest.raises(ValueError, match="hash mismatch"), atomic_writer(target) as out:
        out.write(b"half")
        raise ValueError("hash mismatch")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["root.erofs"]


def test_write_file_atomic_creates_a_new_file(tmp_path: Path) -> None:
    write_file_atomic(tmp_path / "timestamp.json", b"{}")
    assert (tmp_path / "timestamp.json").read_bytes() == b"{}"
    assert (tmp_path / "timestamp.json").stat().st_mode & 0o777 == 0o644
