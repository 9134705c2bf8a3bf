"""A change's new repository files, written aside and put in place together, or not at all.

One publish writes a release's payload, the channel document, new root versions and three roles'
metadata. Each goes to a temporary name in its final directory (written and fsynced there, so
the rename that publishes it is atomic and needs no copy); nothing has its final name until every
file is written and every role signed. Then `commit` renames them in the order they were staged,
the last one (timestamp.json, which makes the new state visible) only once everything before it
is durable. A failure before that, whatever it is (a refused manifest, a signing error, a full
disk), leaves the repository byte for byte as it was: `discard` removes the temporary files and
every directory the change created, the repository's own included. A failure among the renames
puts back what was renamed so far.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from updater.files import durable_temp, fsync_dir, write_file_atomic

FILE_MODE = 0o644  # a repository is served as it is: its files are for everyone to read


class Staging:
    """New files of one change of a repository, staged until `commit` or `discard`."""

    def __init__(self) -> None:
        self._files: dict[Path, Path] = {}  # final path -> its staged temporary file
        self._dirs: list[Path] = []  # directories this change created, parents first

    def make_dirs(self, directory: Path) -> None:
        """Create `directory` and its missing parents, to be removed again by `discard`."""
        missing = []
        while not directory.exists():
            missing.append(directory)
            directory = directory.parent
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                continue  # made meanwhile by another publisher: theirs, not this change's
            self._dirs.append(path)

    def exists(self, path: Path) -> bool:
        """Whether `path` is in the repository, or will be once this change is committed."""
        return path in self._files or path.exists()

    @contextlib.contextmanager
    def writer(self, path: Path) -> Iterator[BinaryIO]:
        """A file to write that becomes `path` at `commit`; staged only if the block succeeds,
        so a check of what was written can refuse it."""
        self.make_dirs(path.parent)
        with durable_temp(path, mode=FILE_MODE) as (out, temp):
            yield out
        earlier = self._files.pop(path, None)
        if earlier is not None:
            earlier.unlink(missing_ok=True)
        self._files[path] = temp  # (re)staged last: renamed after everything staged before it

    def write(self, path: Path, data: bytes) -> None:
        """Stage `data` as `path`."""
        with self.writer(path) as out:
            out.write(data)

    def commit(self) -> None:
        """Rename every staged file into place in staging order, the last one after the others
        are durable; on a failure, put back what was renamed and discard the rest."""
        staged = list(self._files.items())
        renamed: list[tuple[Path, tuple[bytes, int] | None]] = []  # path, what it replaced
        try:
            for index, (path, temp) in enumerate(staged):
                if index == len(staged) - 1:
                    for directory in {p.parent for p, _ in staged}:
                        fsync_dir(directory)
                # Only small metadata is ever replaced (root.json, timestamp.json): payload and
                # versioned files have new names. Kept in memory to put back on a failure.
                replaced = (
                    (path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
                    if path.exists()
                    else None
                )
                os.replace(temp, path)
                del self._files[path]
                renamed.append((path, replaced))
            if staged:
                fsync_dir(staged[-1][0].parent)
        except BaseException:
            for path, replaced in reversed(renamed):
                # Best effort: the disk that failed the rename may fail this too, and the error
                # to report is the first one.
                with contextlib.suppress(OSError):
                    if replaced is None:
                        path.unlink()
                    else:
                        write_file_atomic(path, replaced[0], mode=replaced[1])
            self.discard()
            raise
        self._dirs.clear()

    def discard(self) -> None:
        """Remove every staged file and every directory this change created (when empty)."""
        for temp in self._files.values():
            with contextlib.suppress(OSError):
                temp.unlink()
        self._files.clear()
        for directory in reversed(self._dirs):
            with contextlib.suppress(OSError):
                directory.rmdir()
        self._dirs.clear()
