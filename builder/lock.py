"""One lock for what two builder processes may share: a build's work tree, the build counter."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from builder.log import log


@contextlib.contextmanager
def exclusive(path: Path, holder: str | None = None) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing) for the block.

    A separate lock file rather than a lock on the data itself: the files it guards are replaced by
    rename, and a lock on a replaced file guards nothing. With `holder`, a second caller says whom
    it is waiting for before it blocks; without, it just waits (the wait is short).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if holder is not None:
                log(f"waiting for {holder} to finish ({path})")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
