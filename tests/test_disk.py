"""The GPT disk image: layout, content at the right offsets, sparseness, checked with sfdisk."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from builder.config import ImageConfig, Partitions
from builder.disk import PartitionImage, berth_layout, make_disk, stable_uuid, uki_name
from builder.errors import BuildError
from builder.run import run
from updater.disk import gpt

MiB = 1 << 20
ROOTHASH = "00112233445566778899aabbccddeeff0123456789abcdeffedcba9876543210"
SEED = "berth-test-1.2.3"


def sfdisk_json(path: Path) -> dict[str, Any]:
    table: dict[str, Any] = json.loads(run(["sfdisk", "--json", path], capture=True).stdout)[
        "partitiontable"
    ]
    return table


def sfdisk_verify(path: Path) -> None:
    result = run(["sfdisk", "--verify", path], capture=True, check=False)
    text = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, text
    assert "No errors detected." in text, text


def content(path: Path, size: int, fill: int, sparse_tail: int = 0) -> Path:
    """A file of `size` bytes of `fill`, then `sparse_tail` bytes of zeros."""
    with path.open("wb") as f:
        f.write(bytes([fill]) * size)
        f.truncate(size + sparse_tail)
    return path


def small_layout(tmp_path: Path) -> list[PartitionImage]:
    return [
        PartitionImage(
            gpt.PartitionSpec(gpt.ESP, "ESP", 2 * MiB, uuid.UUID(int=1)),
            content(tmp_path / "esp.img", 3000, 0xE5),
        ),
        PartitionImage(
            gpt.PartitionSpec(gpt.ROOT_X86_64, "root", 3 * MiB, uuid.UUID(int=2)),
            # Data, a whole MiB of zeros (must stay a hole), then data again.
            content(tmp_path / "root.img", MiB, 0xAA, MiB),
            gpt.ATTR_READ_ONLY,
        ),
        PartitionImage(gpt.PartitionSpec(gpt.ROOT_X86_64, "_empty", MiB, uuid.UUID(int=3)), None),
        PartitionImage(
            gpt.PartitionSpec(gpt.LINUX_GENERIC, "STATE", MiB, uuid.UUID(int=4)),
            content(tmp_path / "state.img", MiB, 0x57),
        ),
    ]


def read_at(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def test_make_disk_layout_checked_by_sfdisk(tmp_path: Path) -> None:
    layout = small_layout(tmp_path)
    with (tmp_path / "root.img").open("r+b") as f:
        f.seek(2 * MiB)
        f.write(b"tail")  # root.img: 1 MiB data, 1 MiB zeros, "tail"
    disk = tmp_path / "disk.raw"
    table = make_disk(layout, disk, SEED)
    # 1 MiB before the first partition, the partitions, 1 MiB for the backup GPT.
    assert disk.stat().st_size == (1 + 2 + 3 + 1 + 1 + 1) * MiB
    assert not (tmp_path / ".disk.raw.tmp").exists()
    sfdisk_verify(disk)
    seen = sfdisk_json(disk)
    assert seen["label"] == "gpt"
    assert uuid.UUID(seen["id"]) == stable_uuid(SEED, "disk") == table.disk_guid
    assert [p.get("name", "") for p in seen["partitions"]] == ["ESP", "root", "_empty", "STATE"]
    assert [uuid.UUID(p["type"]) for p in seen["partitions"]] == [
        gpt.ESP,
        gpt.ROOT_X86_64,
        gpt.ROOT_X86_64,
        gpt.LINUX_GENERIC,
    ]
    assert [uuid.UUID(p["uuid"]) for p in seen["partitions"]] == [
        uuid.UUID(int=i) for i in (1, 2, 3, 4)
    ]
    assert [p["start"] * 512 for p in seen["partitions"]] == [1 * MiB, 3 * MiB, 6 * MiB, 7 * MiB]
    assert [p["size"] * 512 for p in seen["partitions"]] == [2 * MiB, 3 * MiB, MiB, MiB]
    # Attributes were given for one partition: only that one has them.
    assert "attrs" not in seen["partitions"][0]
    assert "GUID:60" in seen["partitions"][1]["attrs"]
    with disk.open("rb") as f:
        assert gpt.read_table(f) == table


def test_make_disk_puts_content_at_the_partition_offsets(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    table = make_disk(small_layout(tmp_path), disk, SEED)
    esp, root, empty, state = table.partitions
    assert esp.offset_bytes() == MiB
    assert read_at(disk, esp.offset_bytes(), 3000) == b"\xe5" * 3000
    assert read_at(disk, esp.offset_bytes() + 3000, 100) == bytes(100)
    assert read_at(disk, root.offset_bytes(), MiB) == b"\xaa" * MiB
    assert read_at(disk, root.offset_bytes() + MiB, 2 * MiB) == bytes(2 * MiB)
    assert read_at(disk, empty.offset_bytes(), empty.size_bytes()) == bytes(MiB)
    assert read_at(disk, state.offset_bytes(), MiB) == b"\x57" * MiB
    # Nothing spills before the first partition beyond the protective MBR and primary GPT.
    assert read_at(disk, 34 * 512, MiB - 34 * 512) == bytes(MiB - 34 * 512)


def test_make_disk_leaves_holes_sparse(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    make_disk(small_layout(tmp_path), disk, SEED)
    allocated = disk.stat().st_blocks * 512
    # Data written: 3000 B + 1 MiB + 1 MiB and the two GPT copies; the file is 9 MiB.
    assert allocated < 3 * MiB, allocated
    assert disk.stat().st_size == 9 * MiB


def test_make_disk_is_reproducible(tmp_path: Path) -> None:
    one, two = tmp_path / "one.raw", tmp_path / "two.raw"
    make_disk(small_layout(tmp_path), one, SEED)
    make_disk(small_layout(tmp_path), two, SEED)
    assert one.read_bytes() == two.read_bytes()
    make_disk(small_layout(tmp_path), two, "another-seed")
    assert one.read_bytes() != two.read_bytes()


def test_make_disk_replaces_an_existing_output(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\xff" * (20 * MiB))
    make_disk(small_layout(tmp_path), disk, SEED)
    assert disk.stat().st_size == 9 * MiB
    sfdisk_verify(disk)


def test_content_too_big_for_its_partition(tmp_path: Path) -> None:
    layout = small_layout(tmp_path)
    content(tmp_path / "esp.img", 2 * MiB + 1, 0xE5)
    disk = tmp_path / "disk.raw"
    with pytest.raises(
        BuildError, match=r"esp\.img \(2097153 bytes\) does not fit partition 'ESP'"
    ):
        make_disk(layout, disk, SEED)
    assert not disk.exists()
    assert not (tmp_path / ".disk.raw.tmp").exists()
    # Exactly the partition's size fits.
    content(tmp_path / "esp.img", 2 * MiB, 0xE5)
    make_disk(layout, disk, SEED)
    sfdisk_verify(disk)


def test_stable_uuid_is_deterministic() -> None:
    first = stable_uuid("seed", "esp")
    assert first == stable_uuid("seed", "esp")
    assert first != stable_uuid("seed", "state")
    assert first != stable_uuid("other", "esp")
    assert first.version == 4
    assert first.variant == uuid.RFC_4122
    # Pinned: sha256("berth:seed:esp") with the version and variant bits set. A change here
    # changes the UUIDs of every disk built from now on.
    assert str(first) == "1d41782c-5993-4b31-9aed-069032c253d9"
    assert len({stable_uuid("s", r) for r in ("disk", "esp", "root-b", "verity-b", "state")}) == 5


def small_config() -> ImageConfig:
    return ImageConfig(
        name="test",
        path=Path("/nonexistent/test.toml"),
        partitions=Partitions(esp=2 * MiB, root=3 * MiB, verity=MiB, state=2 * MiB),
    )


def test_berth_layout(tmp_path: Path) -> None:
    files = {name: tmp_path / name for name in ("esp", "root", "verity", "state")}
    layout = berth_layout(
        small_config(),
        "1.2.3",
        ROOTHASH,
        files["esp"],
        files["root"],
        files["verity"],
        files["state"],
        SEED,
    )
    data_uuid, verity_uuid = gpt.uuid_pair_from_roothash(ROOTHASH)
    assert data_uuid == uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
    assert verity_uuid == uuid.UUID("01234567-89ab-cdef-fedc-ba9876543210")
    rows = [
        (p.spec.name, p.spec.type_guid, p.spec.size, p.spec.part_guid, p.content, p.attributes)
        for p in layout
    ]
    ro = gpt.ATTR_READ_ONLY
    assert rows == [
        ("ESP", gpt.ESP, 2 * MiB, stable_uuid(SEED, "esp"), files["esp"], 0),
        ("berth_1.2.3", gpt.ROOT_X86_64, 3 * MiB, data_uuid, files["root"], ro),
        ("berth_1.2.3_verity", gpt.ROOT_X86_64_VERITY, MiB, verity_uuid, files["verity"], ro),
        ("_empty", gpt.ROOT_X86_64, 3 * MiB, stable_uuid(SEED, "root-b"), None, ro),
        ("_empty", gpt.ROOT_X86_64_VERITY, MiB, stable_uuid(SEED, "verity-b"), None, ro),
        ("STATE", gpt.LINUX_GENERIC, 2 * MiB, stable_uuid(SEED, "state"), files["state"], 0),
    ]
    assert len({p.spec.part_guid for p in layout}) == len(layout)
    assert uki_name("1.2.3") == "berth_1.2.3.efi"


def test_berth_layout_makes_a_valid_disk(tmp_path: Path) -> None:
    esp = content(tmp_path / "esp", 4096, 1)
    root = content(tmp_path / "root", 3 * MiB, 2)
    verity = content(tmp_path / "verity", 8192, 3)
    state = content(tmp_path / "state", 0, 0, 2 * MiB)  # all zeros: nothing is written
    layout = berth_layout(small_config(), "1.2.3", ROOTHASH, esp, root, verity, state, SEED)
    disk = tmp_path / "disk.raw"
    table = make_disk(layout, disk, SEED)
    sfdisk_verify(disk)
    seen = sfdisk_json(disk)["partitions"]
    assert [p.get("name", "") for p in seen] == [
        "ESP",
        "berth_1.2.3",
        "berth_1.2.3_verity",
        "_empty",
        "_empty",
        "STATE",
    ]
    assert uuid.UUID(seen[1]["uuid"]) == uuid.UUID(ROOTHASH[:32])
    assert uuid.UUID(seen[2]["uuid"]) == uuid.UUID(ROOTHASH[32:])
    assert [("GUID:60" in p.get("attrs", "")) for p in seen] == [
        False,
        True,
        True,
        True,
        True,
        False,
    ]
    verity_part = table.partitions[2]
    assert read_at(disk, verity_part.offset_bytes(), 8192) == b"\x03" * 8192
    assert disk.stat().st_blocks * 512 < 4 * MiB
    assert os.path.getsize(disk) == (1 + 2 + 3 + 1 + 3 + 1 + 2 + 1) * MiB
