"""The block index format (updater/release/blockindex.py), the publisher's index targets, and the
channel entries that name them."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from builder import publish as pub
from tests.support.machine import make_verity_release
from updater.release import channel as ch
from updater.release.blockindex import (
    BlockIndexError,
    block_count,
    check_index,
    digest_blocks,
    index_file,
)
from updater.release.channel import ChannelError, ChannelManifest
from updater.release.version import Version


@pytest.mark.parametrize("length", [0, 1, 4095, 4096, 4097, 3 * 4096 + 5])
def test_an_index_is_the_sha256_of_each_block_the_last_one_short(
    tmp_path: Path, length: int
) -> None:
    data = os.urandom(length)
    want = b"".join(hashlib.sha256(data[at : at + 4096]).digest() for at in range(0, length, 4096))
    assert digest_blocks(data) == want
    (tmp_path / "f").write_bytes(data)
    assert index_file(tmp_path / "f", chunk=8192) == want
    assert len(want) == 32 * block_count(length)
    check_index(want, length, "f.blocks")


def test_an_index_of_the_wrong_size_names_what_was_expected() -> None:
    with pytest.raises(BlockIndexError, match=r"x: expected 64 bytes .* 2 blocks of a 5000-byte"):
        check_index(b"\0" * 32, 5000, "x")


def test_publish_adds_the_uki_index_as_a_target_named_by_the_channel(tmp_path: Path) -> None:
    pub.init_keys(tmp_path / "keys")
    release = make_verity_release(tmp_path / "out", "1.0.0")
    pub.publish(release, tmp_path / "repo", tmp_path / "keys", "stable", immediate=True)
    targets = json.loads((tmp_path / "repo/metadata/1.targets.json").read_text())["signed"]
    index = targets["targets"]["containerhost/1.0.0/uki.efi.blocks"]
    data = index_file(release / "uki.efi")
    assert index["length"] == len(data)
    assert index["hashes"]["sha256"] == hashlib.sha256(data).hexdigest()
    stored = (
        tmp_path / f"repo/targets/containerhost/1.0.0/{index['hashes']['sha256']}.uki.efi.blocks"
    )
    assert stored.read_bytes() == data
    channel_file = next((tmp_path / "repo/targets/channels").glob("*.stable.json"))
    entry = json.loads(channel_file.read_text())["releases"][0]
    assert entry["targets"]["uki.efi.blocks"] == "containerhost/1.0.0/uki.efi.blocks"


def _entry(**targets: str) -> str:
    names = {name: f"containerhost/1.0.0/{name}" for name in ch.RELEASE_TARGETS}
    release = ch.Release(
        image="containerhost",
        arch="x86_64",
        version=Version(1, 0, 0),
        roothash="ab" * 32,
        targets={**names, **targets},
        waves=ch.immediate_waves(datetime(2026, 1, 1, tzinfo=UTC)),
    )
    return ChannelManifest("stable", None, (release,)).to_json()


def test_a_channel_entry_may_name_the_index_or_not() -> None:
    with_index = ch.parse(_entry(**{"uki.efi.blocks": "containerhost/1.0.0/i"}), "c")
    assert "uki.efi.blocks" in with_index.releases[0].targets
    assert "uki.efi.blocks" not in ch.parse(_entry(), "c").releases[0].targets
    with pytest.raises(ChannelError, match=r"root\.erofs\.blocks"):
        ch.parse(_entry(**{"root.erofs.blocks": "containerhost/1.0.0/r"}), "c")
