"""builder.lock.exclusive: a lock file, or a directory locked as itself."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from builder.lock import exclusive


def _held(path: Path) -> bool:
    """Whether another open file description of `path` is refused the lock."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_lock_file_is_created_and_held_for_the_block(tmp_path: Path) -> None:
    lock = tmp_path / "sub" / "build.lock"
    with exclusive(lock):
        assert _held(lock)
    assert not _held(lock)


def test_a_directory_is_its_own_lock_and_gains_no_file(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    with exclusive(repo):
        assert _held(repo)
    assert not _held(repo)
    assert list(repo.iterdir()) == []


def test_the_lock_is_released_when_the_block_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), exclusive(tmp_path):
        raise RuntimeError
    assert not _held(tmp_path)
