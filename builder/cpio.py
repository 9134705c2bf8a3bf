"""A reproducible cpio "newc" archive writer, the format the kernel unpacks as an initramfs.

Entries are written in sorted order with fixed owners, times and inode numbers, so the same files
always give the same bytes.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import IO

_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    path: str  # relative, no leading slash ("usr/bin/bash")
    mode: int  # full st_mode including the file type bits
    data: bytes = b""  # file contents, or the target of a symlink
    uid: int = 0
    gid: int = 0


def _pad(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def _header(ino: int, entry: Entry, size: int, nlink: int) -> bytes:
    name = entry.path.encode() + b"\0"
    fields = (
        ino,
        entry.mode,
        entry.uid,
        entry.gid,
        nlink,
        0,  # mtime: fixed for reproducibility
        size,
        0,
        0,  # dev major/minor
        0,
        0,  # rdev major/minor
        len(name),
        0,  # checksum (unused in newc)
    )
    head = b"070701" + b"".join(f"{v:08X}".encode() for v in fields) + name
    return head + _pad(len(head))


def write_cpio(out: IO[bytes], entries: list[Entry]) -> None:
    """Write `entries` (any order; sorted here, parents are expected to be listed) and a trailer."""
    for ino, entry in enumerate(sorted(entries, key=lambda e: e.path), start=1):
        is_dir = stat.S_ISDIR(entry.mode)
        data = b"" if is_dir else entry.data
        out.write(_header(ino, entry, len(data), 2 if is_dir else 1))
        out.write(data)
        out.write(_pad(len(data)))
    out.write(_header(0, Entry(_TRAILER, 0), 0, 1))


def read_cpio(data: bytes) -> list[Entry]:
    """Parse a newc archive (used by tests and by `build.py` to inspect initrds)."""
    entries: list[Entry] = []
    offset = 0
    while True:
        if data[offset : offset + 6] != b"070701":
            raise ValueError(f"bad cpio magic at offset {offset}")
        fields = [int(data[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize, mode = fields[11], fields[6], fields[1]
        name_start = offset + 110
        name = data[name_start : name_start + namesize - 1].decode()
        offset = name_start + namesize
        offset += (4 - offset % 4) % 4
        if name == _TRAILER:
            return entries
        body = data[offset : offset + filesize]
        offset += filesize
        offset += (4 - offset % 4) % 4
        entries.append(Entry(name, mode, body, fields[2], fields[3]))
