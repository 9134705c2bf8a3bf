"""One lock for what two builder processes may share: a build's work tree, the build counter, a
TUF repository."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from builder.log import log


@contextlib.contextmanager
def exclusive(path: Path, holder: str | None = None) -> Iterator[None]:
    """Hold an exclusive flock on `path` for the block: a lock file (created if missing), or an
    existing directory.

    A separate lock file rather than a lock on the data itself: the files it guards are replaced by
    rename, and a lock on a replaced file guards nothing. A directory is never replaced that way,
    so it can be its own lock: that suits a tree served as it is (a TUF repository behind a web
    server), where a lock file inside would be served and one beside it may not be writable. With
    `holder`, a second caller says whom it is waiting for before it blocks; without, it just waits
    (the wait is short).
    """
    if path.is_dir():
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if holder is not None:
                log(f"waiting for {holder} to finish ({path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
