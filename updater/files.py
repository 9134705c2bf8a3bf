"""Durable file writes shared by the agent, its state, the boot entries and the publisher; paths
inside a root; text files read so that bad bytes are the reader's error, not a crash.

`resolve_in_root` follows symbolic links inside a directory tree as the kernel would with that tree
as `/` (an image tree being built, the root provisioning writes into): the builder and the
provisioner both use it, so that what they write lands where the tree itself would see it, never
on the host through an absolute link.

Standard library only, and nothing heavy: the resident daemon imports this (see worker.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

# The kernel's limit on links followed in one lookup (ELOOP past it).
MAX_SYMLINKS = 40
_TOML_POSITION = re.compile(r"(.*) \(at (?:line (\d+), column (\d+)|end of document)\)", re.S)


def read_utf8(path: Path, error: Callable[[str], Exception], shown: str | None = None) -> str:
    """The text of `path`, or `error` naming the file (as `shown`, by default its path) and why:
    it cannot be read, or it is not UTF-8 (a UnicodeDecodeError is a ValueError that readers
    catching OSError let through)."""
    name = shown or str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{name}: cannot read: {e.strerror or e}") from None
    return decode_utf8(data, name, error)


def decode_utf8(data: bytes, source: str, error: Callable[[str], Exception]) -> str:
    """`data` as UTF-8 text, or `error` naming `source` and the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{source}: not UTF-8 text (byte {e.start})") from None


def toml_document(text: str, source: str, error: Callable[[str], Exception]) -> dict[str, Any]:
    """`text` parsed as TOML, or `error` naming `source`, the line and column, and the problem.

    tomllib raises more than TOMLDecodeError: RecursionError for arrays or inline tables nested a
    few thousand deep, and ValueError for an integer of more than 4300 digits.
    """
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        match = _TOML_POSITION.fullmatch(str(e))
        if match is None:
            where, reason = "", str(e)
        elif match.group(2) is None:
            where, reason = " at end of file", match.group(1)
        else:
            where, reason = f":{match.group(2)}:{match.group(3)}", match.group(1)
        raise error(f"{source}{where}: not valid TOML: {reason}") from None
    except RecursionError:
        raise error(f"{source}: not valid TOML: nested too deeply") from None
    except ValueError as e:  # int() of too many digits
        raise error(f"{source}: not valid TOML: {str(e).split(';')[0]}") from None


@contextlib.contextmanager
def atomic_writer(path: Path, *, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A file to write that replaces `path` when the block ends: temp file in the same directory,
    fsync, rename, fsync the directory.

    A crash at any point leaves either the old file or the new one, never a mix or a torn file. An
    exception in the block (a check of what was written, say) leaves `path` untouched.
    """
    with durable_temp(path, mode=mode) as (out, temp):
        yield out
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def durable_temp(path: Path, *, mode: int = 0o644) -> Iterator[tuple[BinaryIO, Path]]:
    """A temporary file beside `path` (same directory, so a rename can publish it), with `mode`,
    fsynced when the block ends; removed again if the block raises. Renaming it is the caller's:
    `atomic_writer` does it at once, the publisher's staging only once a whole change is written.
    """
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            yield out, temp
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


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


@dataclass(frozen=True)
class Resolved:
    """Where a path leads inside a root, and which links took it there."""

    path: str  # absolute inside the root; no component a symlink (but the last, if not followed)
    links: tuple[tuple[str, str], ...]  # (link, its target) in the order they were followed
    # The first `..` that tried to climb above the root (which stays where it is, as under
    # chroot): "the path" itself, or "<link> -> <target>". None when nothing tried.
    escape: str | None = None


def resolve_in_root(
    path: str, readlink: Callable[[str], str | None], *, follow: bool = True
) -> Resolved:
    """`path` (absolute in the root) with every symlink followed in the root's terms.

    `readlink(p)` gives the target of the link at root path `p`, or None if `p` is no link
    (missing included: the rest is then taken as written). An absolute target starts again at the
    root; `..` at the root stays there. With `follow` false, a link as the last component is left
    as it is. Raises OSError(ELOOP) past MAX_SYMLINKS links.
    """
    pending = _components(path)
    current = ""
    links: list[tuple[str, str]] = []
    escape: str | None = None
    # Which link's target the components now pending came from, for `escape`.
    origin: list[str] = ["the path"] * len(pending)
    while pending:
        part = pending.pop()
        source = origin.pop()
        if part == "..":
            if not current and escape is None:
                escape = source
            current = current.rpartition("/")[0]
            continue
        candidate = f"{current}/{part}"
        if not pending and not follow:
            current = candidate
            break
        target = readlink(candidate)
        if target is None:
            current = candidate
            continue
        if len(links) >= MAX_SYMLINKS:
            raise OSError(errno.ELOOP, "too many levels of symbolic links", path)
        links.append((candidate, target))
        if target.startswith("/"):
            current = ""
        added = _components(target)
        pending.extend(added)
        origin.extend([f"{candidate} -> {target}"] * len(added))
    return Resolved(current or "/", tuple(links), escape)


def host_readlink(root: Path) -> Callable[[str], str | None]:
    """`readlink` for `resolve_in_root` over the directory tree at `root` on this host."""
    prefix = os.fspath(root).rstrip("/")

    def readlink(candidate: str) -> str | None:
        try:
            return os.readlink(prefix + candidate)
        except OSError:  # not a link, or not there
            return None

    return readlink


def _components(path: str) -> list[str]:
    """Path components in reverse, ready to be popped in order."""
    return [c for c in reversed(path.split("/")) if c and c != "."]
