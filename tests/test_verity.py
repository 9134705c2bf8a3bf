"""updater.disk.verity against the host's real `veritysetup format`: same tree, same root hash."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from builder.run import run
from tests.support.machine import VERITYSETUP
from updater.disk import verity
from updater.errors import VerificationError

BLOCK = 4096


def formatted(tmp_path: Path, blocks: int, *options: str) -> tuple[bytes, bytes, str]:
    """Random data of `blocks` blocks, the tree veritysetup writes for it, and its root hash."""
    data, tree = tmp_path / f"data-{blocks}", tmp_path / f"tree-{blocks}"
    data.write_bytes(os.urandom(blocks * BLOCK))
    out = run([VERITYSETUP, "format", *options, data, tree], capture=True).stdout.decode()
    match = re.search(r"^Root hash:\s+([0-9a-f]{40,})$", out, re.M)
    assert match is not None, out
    return data.read_bytes(), tree.read_bytes(), match[1]


def digests_of(data: bytes, salt: bytes, pieces: list[int]) -> bytes:
    """Feed `data` in pieces of the given sizes (cycled), as the network would."""
    hashes = verity.BlockHashes(salt)
    position, turn = 0, 0
    while position < len(data):
        size = pieces[turn % len(pieces)]
        hashes.update(data[position : position + size])
        position, turn = position + size, turn + 1
    return bytes(hashes.finish("the data"))


# 1 block: no level at all; 2-128: one level; 129: two; 16385: three (128 * 128 + 1).
@pytest.mark.parametrize("blocks", [1, 2, 128, 129, 16385])
def test_the_tree_is_the_one_veritysetup_writes(tmp_path: Path, blocks: int) -> None:
    data, tree, roothash = formatted(tmp_path, blocks)
    sb = verity.Superblock.parse(tree, "root.verity")
    sb.check(len(data), "root.verity")
    digests = digests_of(data, sb.salt, [BLOCK])
    levels, root = verity.build_tree(digests, sb.salt)
    assert root == roothash
    assert tree[BLOCK:] == levels


def test_pieces_of_any_size_give_the_same_digests(tmp_path: Path) -> None:
    data, _, _ = formatted(tmp_path, 40)
    salt = b"\x01" * 32
    whole = digests_of(data, salt, [len(data)])
    assert digests_of(data, salt, [1, 4095, 3, 10_000, 7 * BLOCK + 5]) == whole
    assert digests_of(data, salt, [BLOCK * 3]) == whole


def test_a_partial_last_block_is_refused() -> None:
    hashes = verity.BlockHashes(b"")
    hashes.update(b"x" * (BLOCK + 10))
    with pytest.raises(VerificationError, match="ends with 10 bytes of a block"):
        hashes.finish("root.erofs")


def test_check_tree_accepts_the_real_thing_and_refuses_the_rest(tmp_path: Path) -> None:
    data, tree, roothash = formatted(tmp_path, 300)
    stored = tmp_path / "slot"
    stored.write_bytes(bytes(8192) + tree)  # the tree at an offset, as in a disk image
    sb = verity.Superblock.parse(tree, "root.verity")
    digests = digests_of(data, sb.salt, [65536])
    fd = os.open(stored, os.O_RDWR)
    try:
        assert verity.read_superblock(fd, 8192, "slot B") == sb
        verity.check_tree(fd, 8192, sb, digests, roothash, "slot B")
        # Other data: another root hash.
        other = bytearray(data)
        other[5000] ^= 1
        with pytest.raises(VerificationError, match=r"has verity root hash [0-9a-f]{64}, the"):
            verity.check_tree(
                fd, 8192, sb, digests_of(bytes(other), sb.salt, [BLOCK]), roothash, "slot B"
            )
        # The right data and root hash, but a stored tree that differs.
        os.pwrite(fd, b"\xff", 8192 + BLOCK + 100)
        with pytest.raises(VerificationError, match="first differ at byte 4196 of the tree"):
            verity.check_tree(fd, 8192, sb, digests, roothash, "slot B")
    finally:
        os.close(fd)


def test_check_tree_reads_the_stored_tree_in_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three levels: the top one at byte 4096 of the tree, the middle one (2 blocks) at 8192,
    # the bottom one at 16384: 16385 digests, then zero padding from 540704 to 544768.
    data, tree, roothash = formatted(tmp_path, 16385)
    assert len(tree) == 544768
    monkeypatch.setattr(verity, "_COMPARE", 3 * BLOCK)  # many pieces, the last one short
    sb = verity.Superblock.parse(tree, "root.verity")
    digests = digests_of(data, sb.salt, [1 << 20])
    stored = tmp_path / "slot"

    def check(image: bytes) -> None:
        stored.write_bytes(image)
        fd = os.open(stored, os.O_RDONLY)
        try:
            verity.check_tree(fd, 0, sb, digests, roothash, "slot B")
        finally:
            os.close(fd)

    check(tree)
    for at in (542000, 300000, 9000):  # in the padding, the digests, the middle level
        tampered = bytearray(tree)
        tampered[at] ^= 0x40
        with pytest.raises(VerificationError, match=f"first differ at byte {at} of the tree"):
            check(bytes(tampered))
    # Two levels differ: the first difference in the tree is named, not the first found.
    tampered = bytearray(tree)
    tampered[300000] ^= 1
    tampered[5000] ^= 1
    with pytest.raises(VerificationError, match="first differ at byte 5000 of the tree"):
        check(bytes(tampered))
    with pytest.raises(VerificationError, match="first differ at byte 300000 of the tree"):
        check(tree[:300000])  # a partition too short for the tree


def test_superblock_refusals(tmp_path: Path) -> None:
    data, tree, _ = formatted(tmp_path, 8)
    sb = verity.Superblock.parse(tree, "root.verity")
    with pytest.raises(VerificationError, match=r"root\.verity holds no verity superblock"):
        verity.Superblock.parse(data, "root.verity")
    with pytest.raises(VerificationError, match="covers 8 blocks of 4096 bytes, the data is"):
        sb.check(7 * BLOCK, "root.verity")
    (tmp_path / "sha1").mkdir()
    _, sha1, _ = formatted(tmp_path / "sha1", 8, "--hash=sha1")
    with pytest.raises(VerificationError, match="says algorithm 'sha1', expected 'sha256'"):
        verity.Superblock.parse(sha1, "root.verity").check(8 * BLOCK, "root.verity")
