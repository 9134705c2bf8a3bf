"""dm-verity's hash tree, as `veritysetup format` writes it, computed while the data streams by.

`apply` hashes each block of root.erofs on its way into the slot (`BlockHashes`), builds the tree
from those hashes (`build_tree`) and accepts the slot only when that tree's root is the signed
root hash and the tree is, byte for byte, the root.verity already in the slot (`check_tree`).
That is what `veritysetup verify` establishes by reading the whole slot back; done in the stream,
the payload is read once, from the network, and never again from the disk.

The on-disk format (cryptsetup's lib/verity, the kernel's dm-verity target; format 1): a
superblock padded to one hash block, then the levels from the top one (a single block) down to
the one that hashes the data blocks. Each level is a whole number of hash blocks holding the
digests of the blocks below it, zero-padded; a digest is sha256(salt || block). The root hash is
the digest of the top block. Only what Berth's builder writes is accepted: sha256, 4 KiB blocks.

Runs on the device: standard library only.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from updater.errors import VerificationError

# cryptsetup's struct verity_sb (little endian), up to the salt: what the rest of it pads.
_SUPERBLOCK = struct.Struct("<8sII16s32sIIQH6s256s")
_MAGIC = b"verity\0\0"
BLOCK = 4096
_DIGEST = 32  # sha256


@dataclass(frozen=True)
class Superblock:
    """What a hash tree says about the data it covers."""

    version: int
    hash_type: int
    algorithm: str
    data_block_size: int
    hash_block_size: int
    data_blocks: int
    salt: bytes

    @property
    def data_size(self) -> int:
        return self.data_blocks * self.data_block_size

    @classmethod
    def parse(cls, raw: bytes, where: str) -> Superblock:
        """The superblock at the start of `raw`; VerificationError naming `where` otherwise."""
        if len(raw) < _SUPERBLOCK.size or not raw.startswith(_MAGIC):
            raise VerificationError(f"refused: {where} holds no verity superblock")
        _, version, hash_type, _, algorithm, data_bs, hash_bs, blocks, salt_size, _, salt = (
            _SUPERBLOCK.unpack_from(raw)
        )
        if salt_size > len(salt):
            raise VerificationError(
                f"refused: the verity superblock in {where} has a salt of {salt_size} bytes "
                f"(at most {len(salt)})"
            )
        return cls(
            version=version,
            hash_type=hash_type,
            algorithm=algorithm.rstrip(b"\0").decode("ascii", errors="replace"),
            data_block_size=data_bs,
            hash_block_size=hash_bs,
            data_blocks=blocks,
            salt=salt[:salt_size],
        )

    def check(self, data_size: int, where: str) -> None:
        """Refuse a tree this module cannot compute, or one that does not cover `data_size`."""
        expected = {
            "version": (self.version, 1),
            "hash type": (self.hash_type, 1),
            "algorithm": (self.algorithm, "sha256"),
            "data block size": (self.data_block_size, BLOCK),
            "hash block size": (self.hash_block_size, BLOCK),
        }
        for field, (got, want) in expected.items():
            if got != want:
                raise VerificationError(
                    f"refused: the verity superblock in {where} says {field} {got!r}, "
                    f"expected {want!r}"
                )
        # The root hash covers only the blocks the superblock names: they must be all the data.
        if self.data_size != data_size:
            raise VerificationError(
                f"refused: the verity superblock in {where} covers {self.data_blocks} blocks of "
                f"{self.data_block_size} bytes, the data is {data_size} bytes"
            )


def read_superblock(fd: int, offset: int, where: str) -> Superblock:
    """The superblock of the tree starting at `offset` of `fd`."""
    try:
        raw = os.pread(fd, _SUPERBLOCK.size, offset)
    except OSError as e:
        raise VerificationError(
            f"refused: cannot read the verity superblock in {where}: {e}"
        ) from e
    return Superblock.parse(raw, where)


def _digests(salted: Any, view: bytes | bytearray | memoryview) -> bytearray:
    """The digests of the whole blocks in `view`, each sha256(salt || block), `salted` being a
    sha256 fed the salt."""
    out = bytearray()
    for start in range(0, len(view) - BLOCK + 1, BLOCK):
        digest = salted.copy()
        digest.update(view[start : start + BLOCK])  # 4 KiB: hashlib releases the GIL meanwhile
        out += digest.digest()
    return out


class BlockHashes:
    """The salted sha256 of each data block, in order, from data fed in pieces of any size.

    `update` hashes on the caller's thread. To spread the hashing over threads, a caller splits
    the data with `pieces` (in order, on one thread), hashes each piece with `hash_blocks`
    anywhere, and hands the results back with `add`, in the order of the pieces."""

    def __init__(self, salt: bytes) -> None:
        self.salt = salt
        self._salted = hashlib.sha256(salt)
        self.digests = bytearray()
        self._partial = bytearray()  # the start of a block whose end has not come yet

    def reset(self) -> None:
        self.digests.clear()
        self._partial.clear()

    def pieces(self, data: bytes | memoryview) -> list[bytes | memoryview]:
        """`data` as runs of whole blocks, the start of a block left over from the previous call
        first; a trailing part of a block is kept for the next call."""
        view = memoryview(data)
        out: list[bytes | memoryview] = []
        if self._partial:
            take = BLOCK - len(self._partial)
            self._partial += view[:take]
            view = view[take:]
            if len(self._partial) < BLOCK:
                return out
            out.append(bytes(self._partial))
            self._partial.clear()
        whole = len(view) - len(view) % BLOCK
        if whole:
            out.append(view[:whole])
        self._partial += view[whole:]
        return out

    def hash_blocks(self, piece: bytes | memoryview) -> bytearray:
        """The digests of the whole blocks in `piece` (thread-safe: the salted state is copied)."""
        return _digests(self._salted, piece)

    def add(self, digests: bytes | bytearray) -> None:
        self.digests += digests

    def update(self, data: bytes | memoryview) -> None:
        for piece in self.pieces(data):
            self.digests += _digests(self._salted, piece)

    def finish(self, where: str) -> bytearray:
        """Hand over the digests of all blocks (without a copy: a 2 GiB root has 16 MiB of
        them); the data must have been a whole number of blocks."""
        if self._partial:
            raise VerificationError(
                f"refused: {where} ends with {len(self._partial)} bytes of a block: a verity "
                f"data device is a whole number of {BLOCK}-byte blocks"
            )
        digests, self.digests = self.digests, bytearray()
        return digests


Digests = bytes | bytearray | memoryview


def _level_sizes(blocks: int) -> list[int]:
    """The size in bytes of each level of the tree over `blocks` data blocks, the bottom one
    first: whole hash blocks, until a level is a single block (no level at all over one)."""
    sizes = []
    while blocks > 1:
        size = -(-blocks * _DIGEST // BLOCK) * BLOCK  # the digests, zero-padded to a block
        sizes.append(size)
        blocks = size // BLOCK
    return sizes


def tree_size(superblock: Superblock) -> int:
    """The bytes of the tree file: the superblock's block, then every level."""
    return superblock.hash_block_size + sum(_level_sizes(superblock.data_blocks))


def _walk(digests: Digests, salt: bytes, visit: Callable[[memoryview, int, int], None]) -> str:
    """Build the tree from the bottom up, one level at a time: `visit(level, position, size)`
    sees each level's digests (its zero padding left implicit), where the level starts within
    the tree as it follows the superblock on disk, from the top, and its size there, padding
    included. Returns the root hash in hex.

    Only the level being built is held besides `digests`: 1/128 of the one below it."""
    if len(digests) % _DIGEST or not digests:
        raise ValueError(f"{len(digests)} bytes are not a non-empty list of sha256 digests")
    sizes = _level_sizes(len(digests) // _DIGEST)
    level = memoryview(digests)
    if not sizes:
        # One data block: the kernel builds no level and its digest is the root.
        return bytes(level).hex()
    salted = hashlib.sha256(salt)
    for index, size in enumerate(sizes):
        visit(level, sum(sizes[index + 1 :]), size)  # the levels above come first on disk
        whole = len(level) - len(level) % BLOCK
        above = _digests(salted, level[:whole])
        if whole < len(level):
            above += _digests(salted, bytes(level[whole:]).ljust(BLOCK, b"\0"))
        level = memoryview(above)
    return bytes(level).hex()


def build_tree(digests: Digests, salt: bytes) -> tuple[bytes, str]:
    """The hash levels (as they follow the superblock on disk) over data blocks with `digests`,
    and the root hash in hex."""
    levels: list[bytes] = []

    def keep(level: memoryview, position: int, size: int) -> None:
        levels.append(bytes(level).ljust(size, b"\0"))

    root = _walk(digests, salt, keep)
    return b"".join(reversed(levels)), root


_COMPARE = 1 << 20  # bytes of the stored tree read at a time


def _first_difference(fd: int, start: int, level: memoryview, padded: int) -> int | None:
    """Where, from the start of `level`, the `padded` bytes stored at `start` of `fd` first
    differ from `level` and its zero padding; None when they are the same."""
    for at in range(0, padded, _COMPARE):
        want = bytes(level[at : at + _COMPARE]).ljust(min(_COMPARE, padded - at), b"\0")
        got = os.pread(fd, len(want), start + at)
        if got != want:
            return at + next(
                (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                min(len(got), len(want)),
            )
    return None


def check_tree(
    fd: int, offset: int, superblock: Superblock, digests: Digests, roothash: str, where: str
) -> None:
    """The data whose block `digests` these are must have `roothash`, and the tree stored at
    `offset` of `fd` (after its superblock) must be the one built from them.

    The stored tree is compared level by level as the levels are built, a MiB at a time: the
    check holds little more than `digests` however large the root is."""
    start = offset + superblock.hash_block_size
    differs: list[int] = []  # the first difference within each level that has one

    def compare(level: memoryview, position: int, size: int) -> None:
        try:
            at = _first_difference(fd, start + position, level, size)
        except OSError as e:
            raise VerificationError(f"refused: cannot read the hash tree in {where}: {e}") from e
        if at is not None:
            differs.append(position + at)

    root = _walk(digests, superblock.salt, compare)
    # Data that is not the release's also gives a tree unlike the signed one: the root hash is
    # the finding worth reporting then.
    if root != roothash.lower():
        raise VerificationError(
            f"refused: the data written to {where} has verity root hash {root}, the signed "
            f"release says {roothash}"
        )
    if differs:
        raise VerificationError(
            f"refused: the hash tree in {where} is not the one its data gives (they first "
            f"differ at byte {superblock.hash_block_size + min(differs)} of the tree)"
        )


def data_digests_at(offset: int, superblock: Superblock, where: str) -> int:
    """Where, in the file whose tree starts at `offset`, the digests of the data blocks are
    stored: the tree's bottom level, which comes last on disk."""
    sizes = _level_sizes(superblock.data_blocks)
    if not sizes:
        raise VerificationError(f"refused: the tree in {where} covers one block and has no levels")
    return offset + superblock.hash_block_size + sum(sizes[1:])


def read_data_digests(
    fd: int, offset: int, superblock: Superblock, where: str, first: int = 0, end: int | None = None
) -> bytes:
    """The digests of data blocks first..end-1 (all by default) as the tree at `offset` of `fd`
    stores them. Nothing here proves them: a caller trusts them as far as it trusts the tree (a
    signed hash of the whole file, or `check_tree` afterwards), or uses them only as hints whose
    blocks it hashes again."""
    end = superblock.data_blocks if end is None else min(end, superblock.data_blocks)
    start = data_digests_at(offset, superblock, where) + first * _DIGEST
    want = max(0, end - first) * _DIGEST
    try:
        # One read gives the bytes without a copy: 16 MiB for a 2 GiB root, which a copy out of
        # a buffer would hold twice at the apply's peak. A short read (rare) is continued.
        data = os.pread(fd, want, start)
        while len(data) < want:
            piece = os.pread(fd, want - len(data), start + len(data))
            if not piece:
                break
            data += piece
    except OSError as e:
        raise VerificationError(f"refused: cannot read the hash tree in {where}: {e}") from e
    if len(data) != want:
        raise VerificationError(
            f"refused: the hash tree in {where} ends {want - len(data)} bytes before the end "
            "of its bottom level"
        )
    return data
