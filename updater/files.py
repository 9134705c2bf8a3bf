"""Durable file writes shared by the agent, its state, the boot entries and the publisher.

Standard library only, and nothing heavy: the resident daemon imports this (see worker.py).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_writer(path: Path, *, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A file to write that replaces `path` when the block ends: temp file in the same directory,
    fsync, rename, fsync the directory.

    A crash at any point leaves either the old file or the new one, never a mix or a torn file. An
    exception in the block (a check of what was written, say) leaves `path` untouched.
    """
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as temp:
            os.fchmod(temp.fileno(), mode)
            yield temp
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    fsync_dir(path.parent)


def write_file_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace `path` with `data`, as `atomic_writer` does."""
    with atomic_writer(path, mode=mode) as temp:
        temp.write(data)


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in `directory` durable."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
