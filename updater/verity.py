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


def _digests(salted: Any, view: memoryview | bytearray) -> bytes:
    """The digests of the whole blocks in `view`, each sha256(salt || block), `salted` being a
    sha256 fed the salt."""
    out = bytearray()
    for start in range(0, len(view) - BLOCK + 1, BLOCK):
        digest = salted.copy()
        digest.update(view[start : start + BLOCK])  # 4 KiB: hashlib releases the GIL meanwhile
        out += digest.digest()
    return bytes(out)


class BlockHashes:
    """The salted sha256 of each data block, in order, from data fed in pieces of any size."""

    def __init__(self, salt: bytes) -> None:
        self._salted = hashlib.sha256(salt)
        self.digests = bytearray()
        self._partial = bytearray()  # the start of a block whose end has not come yet

    def reset(self) -> None:
        self.digests.clear()
        self._partial.clear()

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        if self._partial:
            take = BLOCK - len(self._partial)
            self._partial += view[:take]
            view = view[take:]
            if len(self._partial) < BLOCK:
                return
            self.digests += _digests(self._salted, self._partial)
            self._partial.clear()
        whole = len(view) - len(view) % BLOCK
        self.digests += _digests(self._salted, view[:whole])
        self._partial += view[whole:]

    def finish(self, where: str) -> bytes:
        """The digests of all blocks; the data must have been a whole number of blocks."""
        if self._partial:
            raise VerificationError(
                f"refused: {where} ends with {len(self._partial)} bytes of a block: a verity "
                f"data device is a whole number of {BLOCK}-byte blocks"
            )
        return bytes(self.digests)


def build_tree(digests: bytes, salt: bytes) -> tuple[bytes, str]:
    """The hash levels (as they follow the superblock on disk) over data blocks with `digests`,
    and the root hash in hex."""
    if len(digests) % _DIGEST or not digests:
        raise ValueError(f"{len(digests)} bytes are not a non-empty list of sha256 digests")
    if len(digests) == _DIGEST:
        # One data block: the kernel builds no level and its digest is the root.
        return b"", digests.hex()
    salted = hashlib.sha256(salt)
    levels: list[bytes] = []
    level = digests
    while True:
        padded = level + bytes(-len(level) % BLOCK)
        levels.append(padded)
        above = _digests(salted, memoryview(padded))
        if len(padded) == BLOCK:
            return b"".join(reversed(levels)), above.hex()
        level = above


def check_tree(
    fd: int, offset: int, superblock: Superblock, digests: bytes, roothash: str, where: str
) -> None:
    """The data whose block `digests` these are must have `roothash`, and the tree stored at
    `offset` of `fd` (after its superblock) must be the one built from them."""
    tree, root = build_tree(digests, superblock.salt)
    if root != roothash.lower():
        raise VerificationError(
            f"refused: the data written to {where} has verity root hash {root}, the signed "
            f"release says {roothash}"
        )
    start = offset + superblock.hash_block_size
    try:
        stored = os.pread(fd, len(tree), start) if tree else b""
    except OSError as e:
        raise VerificationError(f"refused: cannot read the hash tree in {where}: {e}") from e
    if stored != tree:
        at = next(
            (i for i, (a, b) in enumerate(zip(stored, tree, strict=False)) if a != b),
            min(len(stored), len(tree)),
        )
        raise VerificationError(
            f"refused: the hash tree in {where} is not the one its data gives (they first "
            f"differ at byte {superblock.hash_block_size + at} of the tree)"
        )
