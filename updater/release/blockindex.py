"""The block index of a payload file: the sha256 of each of its 4 KiB blocks, in order.

A machine that updates compares the index of a new release's file with the blocks it already
holds (the UKI it booted, the hash tree of its booted slot), copies those it has and fetches only
the others by HTTP range (updater/update/seeded.py). The publisher writes the index of `uki.efi`
and of `root.verity` as TUF targets of their own (`uki.efi.blocks`, `root.verity.blocks`), so
every digest is as trusted as the file's own hash. `root.erofs` needs none: its dm-verity tree is
its index (the salted digest of each block), already a target. The tree's own index is 1/128 of
the tree (10 KB for a 190 MB root): where a release changes a few blocks of the root, it saves
fetching the whole tree (1.2 MB), most of what such an update moves.

The format is the digests alone, 32 bytes each, no header: block i covers bytes
[4096 i, 4096 (i + 1)) of the file, the last one whatever is left (its digest is that of the
shorter piece). So its length is fixed by the file's signed length, and checked against it.

Standard library only: the builder and the agent share it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK = 4096
DIGEST = 32
SUFFIX = ".blocks"  # uki.efi -> uki.efi.blocks
# The payload files published with an index target (root.erofs is indexed by its tree).
INDEXED_FILES = ("root.verity", "uki.efi")


class BlockIndexError(ValueError):
    """An index does not fit the file it claims to describe."""


def index_name(name: str) -> str:
    return name + SUFFIX


def block_count(length: int) -> int:
    return -(-length // BLOCK)


def digest_blocks(data: bytes | bytearray | memoryview) -> bytes:
    """The index of `data` (any length; the last block may be short)."""
    view = memoryview(data)
    return b"".join(
        hashlib.sha256(view[at : at + BLOCK]).digest() for at in range(0, len(view), BLOCK)
    )


def index_file(path: Path, chunk: int = 256 * BLOCK) -> bytes:
    """The index of the file at `path`, read a chunk (a whole number of blocks) at a time."""
    out = bytearray()
    with path.open("rb") as f:
        while data := f.read(chunk):
            out += digest_blocks(data)
    return bytes(out)


def check_index(data: bytes | bytearray, length: int, where: str) -> None:
    """`data` must be an index of a file of `length` bytes."""
    want = block_count(length) * DIGEST
    if len(data) != want:
        raise BlockIndexError(
            f"{where}: expected {want} bytes (a {DIGEST}-byte sha256 for each of the "
            f"{block_count(length)} blocks of a {length}-byte file), got {len(data)}"
        )
