"""GPT writer/reader: checked against sfdisk in both directions, on sparse image files."""

from __future__ import annotations

import itertools
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from builder.run import run
from updater.disk import gpt

GIB = 1024**3
MIB = 1024**2
DISK_SIZE = 3 * GIB
DISK_GUID = uuid.UUID("8a0c2b5e-2f43-4d7e-9c61-0b9a6f1d2e3c")
ROOTHASH = "00112233445566778899aabbccddeeff0123456789abcdeffedcba9876543210"


def berth_specs() -> list[gpt.PartitionSpec]:
    root_a, verity_a = gpt.uuid_pair_from_roothash(ROOTHASH)
    return [
        gpt.PartitionSpec(gpt.ESP, "ESP", 1 * GIB, uuid.UUID(int=0xE5)),
        gpt.PartitionSpec(gpt.ROOT_X86_64, "root-A", 64 * MIB, root_a),
        gpt.PartitionSpec(gpt.ROOT_X86_64_VERITY, "root-A-verity", 8 * MIB, verity_a),
        gpt.PartitionSpec(gpt.ROOT_X86_64, "_empty", 64 * MIB, uuid.UUID(int=0xB1)),
        gpt.PartitionSpec(gpt.ROOT_X86_64_VERITY, "_empty", 8 * MIB, uuid.UUID(int=0xB2)),
        gpt.PartitionSpec(gpt.VAR, "STATE", None, uuid.UUID(int=0x57)),
    ]


def sfdisk_json(path: Path) -> dict[str, Any]:
    out = run(["sfdisk", "--json", path], capture=True).stdout
    table: dict[str, Any] = json.loads(out)["partitiontable"]
    return table


def sfdisk_verify(path: Path) -> str:
    result = run(["sfdisk", "--verify", path], capture=True, check=False)
    text = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, text
    assert "No errors detected." in text, text
    return text


def assert_matches_sfdisk(path: Path, table: gpt.Table) -> None:
    seen = sfdisk_json(path)
    assert seen["label"] == "gpt"
    assert uuid.UUID(seen["id"]) == table.disk_guid
    assert seen["firstlba"] == table.first_usable_lba
    assert seen["lastlba"] == table.last_usable_lba
    assert len(seen["partitions"]) == len(table.partitions)
    for part, entry in zip(table.partitions, seen["partitions"], strict=True):
        assert uuid.UUID(entry["type"]) == part.type_guid
        assert uuid.UUID(entry["uuid"]) == part.part_guid
        assert entry.get("name", "") == part.name
        assert entry["start"] == part.first_lba
        assert entry["size"] * 512 == part.size_bytes()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with path.open("wb") as f:
        f.truncate(DISK_SIZE)
    return path


def write_berth_table() -> gpt.Table:
    return gpt.plan_table(DISK_SIZE, berth_specs(), DISK_GUID)


def write_berth(image: Path) -> gpt.Table:
    table = write_berth_table()
    with image.open("r+b") as f:
        gpt.write_table(f, DISK_SIZE, table)
    return table


def test_plan_layout_is_aligned_and_contiguous() -> None:
    table = gpt.plan_table(DISK_SIZE, berth_specs(), DISK_GUID)
    parts = table.partitions
    assert parts[0].offset_bytes() == MIB
    assert [p.size_bytes() for p in parts[:5]] == [GIB, 64 * MIB, 8 * MIB, 64 * MIB, 8 * MIB]
    for before, after in itertools.pairwise(parts):
        assert after.offset_bytes() % MIB == 0
        assert after.first_lba == before.last_lba + 1
    assert parts[-1].last_lba == table.last_usable_lba == DISK_SIZE // 512 - 34
    assert table.first_usable_lba == 34


def test_plan_rounds_sizes_up_to_mib() -> None:
    specs = [gpt.PartitionSpec(gpt.LINUX_GENERIC, "a", MIB + 1, uuid.UUID(int=1))]
    (part,) = gpt.plan_table(DISK_SIZE, specs, DISK_GUID).partitions
    assert part.size_bytes() == 2 * MIB


def test_plan_rejects_bad_specs() -> None:
    rest = gpt.PartitionSpec(gpt.LINUX_GENERIC, "rest", None, uuid.UUID(int=1))
    tail = gpt.PartitionSpec(gpt.LINUX_GENERIC, "tail", MIB, uuid.UUID(int=2))
    with pytest.raises(ValueError, match="not the last"):
        gpt.plan_table(DISK_SIZE, [rest, tail], DISK_GUID)
    huge = gpt.PartitionSpec(gpt.LINUX_GENERIC, "huge", DISK_SIZE, uuid.UUID(int=3))
    with pytest.raises(ValueError, match="does not fit"):
        gpt.plan_table(DISK_SIZE, [huge], DISK_GUID)
    with pytest.raises(ValueError, match="share the UUID"):
        gpt.plan_table(DISK_SIZE, [tail, tail], DISK_GUID)


def test_written_table_is_what_sfdisk_sees(image: Path) -> None:
    table = write_berth(image)
    assert_matches_sfdisk(image, table)
    sfdisk_verify(image)
    with image.open("rb") as f:
        mbr = f.read(512)
    assert mbr[510:] == b"\x55\xaa"
    assert mbr[446 + 4] == 0xEE
    assert int.from_bytes(mbr[446 + 12 : 446 + 16], "little") == DISK_SIZE // 512 - 1


def test_roothash_uuids_land_on_disk_as_systemd_expects(image: Path) -> None:
    write_berth(image)
    entries = sfdisk_json(image)["partitions"]
    assert entries[1]["uuid"].lower() == "00112233-4455-6677-8899-aabbccddeeff"
    assert entries[2]["uuid"].lower() == "01234567-89ab-cdef-fedc-ba9876543210"


def test_read_table_round_trip(image: Path) -> None:
    table = write_berth(image)
    with image.open("rb") as f:
        assert gpt.read_table(f) == table
        assert gpt.read_table(f, DISK_SIZE) == table


def test_update_partition_round_trip(image: Path) -> None:
    write_berth(image)
    new_data, new_verity = gpt.uuid_pair_from_roothash("ab" * 16 + "cd" * 16)
    with image.open("r+b") as f:
        gpt.update_partition(f, 3, part_guid=new_data, name="root-B")
        table = gpt.update_partition(f, 4, part_guid=new_verity, name="root-B-verity")
        assert gpt.read_table(f) == table
    assert table.partitions[3].part_guid == new_data
    assert table.partitions[3].name == "root-B"
    assert table.partitions[3].type_guid == gpt.ROOT_X86_64
    assert table.partitions[4].name == "root-B-verity"
    assert table.partitions[:3] == write_berth_table().partitions[:3]
    assert_matches_sfdisk(image, table)
    sfdisk_verify(image)


def test_update_partition_refuses_duplicate_uuid_and_bad_index(image: Path) -> None:
    table = write_berth(image)
    with image.open("r+b") as f:
        with pytest.raises(gpt.GptError, match="share the UUID"):
            gpt.update_partition(f, 3, part_guid=table.partitions[1].part_guid)
        with pytest.raises(IndexError):
            gpt.update_partition(f, 6, name="x")
        assert gpt.read_table(f) == table


def corrupt(image: Path, offset: int) -> None:
    with image.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_corrupt_primary_header_falls_back_to_backup(image: Path) -> None:
    table = write_berth(image)
    corrupt(image, 512 + 56)  # inside the disk GUID
    with image.open("r+b") as f:
        assert gpt.read_table(f) == table
        # Editing through the backup rewrites a valid primary as well.
        updated = gpt.update_partition(f, 3, name="root-B")
    assert_matches_sfdisk(image, updated)
    sfdisk_verify(image)


def test_corrupt_primary_entries_fall_back_to_backup(image: Path) -> None:
    table = write_berth(image)
    corrupt(image, 2 * 512 + 32)  # first LBA of partition 1
    with image.open("rb") as f:
        assert gpt.read_table(f) == table


def test_both_copies_corrupt_raises_with_both_reasons(image: Path) -> None:
    write_berth(image)
    corrupt(image, 512 + 56)
    corrupt(image, DISK_SIZE - 512)  # backup signature
    with (
        image.open("rb") as f,
        pytest.raises(gpt.GptError, match=r"primary header .*CRC mismatch.*backup .*signature"),
    ):
        gpt.read_table(f)


def test_no_gpt_at_all(tmp_path: Path) -> None:
    path = tmp_path / "blank.raw"
    with path.open("wb") as f:
        f.truncate(8 * MIB)
    with path.open("rb") as f, pytest.raises(gpt.GptError, match="no valid GPT header"):
        gpt.read_table(f)


def test_backup_is_synced_before_primary_is_touched(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = write_berth(image)
    with image.open("rb") as f:
        primary_before = f.read(34 * 512)

    def crash(fd: int) -> None:
        raise OSError("simulated power loss")

    monkeypatch.setattr(os, "fsync", crash)
    with image.open("r+b") as dev, pytest.raises(OSError, match="power loss"):
        gpt.update_partition(dev, 3, name="root-B")
    monkeypatch.undo()

    with image.open("rb") as f:
        assert f.read(34 * 512) == primary_before
        assert gpt.read_table(f) == old
    corrupt(image, 512 + 56)
    with image.open("rb") as f:
        assert gpt.read_table(f).partitions[3].name == "root-B"


def test_sfdisk_written_table_is_read(image: Path) -> None:
    disk = "5F1E6B1C-3A0E-4B4B-8D9C-6E6E0C6B2A11"
    part1 = "11111111-2222-3333-4444-555555555555"
    part2 = "AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE"
    script = (
        "label: gpt\n"
        f"label-id: {disk}\n"
        f'start=2048, size=204800, type={gpt.ESP}, uuid={part1}, name="EFI System",'
        ' attrs="RequiredPartition,GUID:60"\n'
        f'size=131072, type={gpt.ROOT_X86_64_VERITY}, uuid={part2}, name="Wurzel-ä"\n'
        f"type={gpt.LINUX_GENERIC}\n"
    )
    run(["sfdisk", "--quiet", image], input=script.encode())
    seen = sfdisk_json(image)
    with image.open("rb") as f:
        table = gpt.read_table(f)
    assert table.disk_guid == uuid.UUID(disk)
    esp, verity, rest = table.partitions
    assert (esp.type_guid, esp.part_guid, esp.name) == (gpt.ESP, uuid.UUID(part1), "EFI System")
    assert (esp.first_lba, esp.sectors) == (2048, 204800)
    assert esp.attributes == gpt.ATTR_REQUIRED | gpt.ATTR_READ_ONLY
    assert (verity.part_guid, verity.name, verity.sectors) == (uuid.UUID(part2), "Wurzel-ä", 131072)
    assert rest.name == ""
    assert rest.first_lba == seen["partitions"][2]["start"]
    assert rest.sectors == seen["partitions"][2]["size"]
    assert (table.first_usable_lba, table.last_usable_lba) == (seen["firstlba"], seen["lastlba"])

    # And the other way: our edit of sfdisk's table still satisfies sfdisk.
    with image.open("r+b") as f:
        gpt.update_partition(f, 2, type_guid=gpt.VAR, name="STATE")
    sfdisk_verify(image)
    assert uuid.UUID(sfdisk_json(image)["partitions"][2]["type"]) == gpt.VAR
    assert sfdisk_json(image)["partitions"][0]["attrs"] == "RequiredPartition GUID:60"


def test_uuid_pair_from_roothash() -> None:
    data, verity = gpt.uuid_pair_from_roothash(ROOTHASH.upper())
    assert str(data) == "00112233-4455-6677-8899-aabbccddeeff"
    assert str(verity) == "01234567-89ab-cdef-fedc-ba9876543210"
    # On disk the GUID is mixed-endian: the first three groups are byte-swapped.
    assert data.bytes_le[:8] == bytes.fromhex("3322110055447766")


@pytest.mark.parametrize("bad", ["", "00" * 31, "00" * 33, "zz" * 32, " " + "00" * 31 + "0"])
def test_uuid_pair_rejects_malformed_hash(bad: str) -> None:
    with pytest.raises(ValueError, match="64 hex digits"):
        gpt.uuid_pair_from_roothash(bad)


def test_partition_names() -> None:
    gpt.Partition(gpt.ESP, uuid.uuid4(), 2048, 4095, "x" * 36)
    with pytest.raises(ValueError, match="at most 36"):
        gpt.Partition(gpt.ESP, uuid.uuid4(), 2048, 4095, "x" * 37)
    # Characters outside the BMP take two UTF-16 units each.
    with pytest.raises(ValueError, match="at most 36"):
        gpt.Partition(gpt.ESP, uuid.uuid4(), 2048, 4095, "\U0001f6a2" * 19)
    with pytest.raises(ValueError, match="at most 36"):
        gpt.plan_table(
            DISK_SIZE, [gpt.PartitionSpec(gpt.ESP, "y" * 37, MIB, uuid.uuid4())], DISK_GUID
        )


def test_non_ascii_name_round_trip(image: Path) -> None:
    specs = [gpt.PartitionSpec(gpt.LINUX_GENERIC, "Zustand-ß-\U0001f6a2", None, uuid.uuid4())]
    table = gpt.plan_table(DISK_SIZE, specs, DISK_GUID)
    with image.open("r+b") as f:
        gpt.write_table(f, DISK_SIZE, table)
        assert gpt.read_table(f) == table
    assert sfdisk_json(image)["partitions"][0]["name"] == "Zustand-ß-\U0001f6a2"


def test_4k_sectors_round_trip(image: Path) -> None:
    table = gpt.plan_table(DISK_SIZE, berth_specs(), DISK_GUID, sector_size=4096)
    assert table.first_usable_lba == 6
    assert table.partitions[0].offset_bytes(4096) == MIB
    with image.open("r+b") as f:
        gpt.write_table(f, DISK_SIZE, table)
        assert gpt.read_table(f, sector_size=4096) == table
        with pytest.raises(gpt.GptError):
            gpt.read_table(f)


def test_device_size_keeps_position(image: Path) -> None:
    with image.open("rb") as f:
        f.seek(4096)
        assert gpt.device_size(f) == DISK_SIZE
        assert f.tell() == 4096


def test_disk_too_small() -> None:
    with pytest.raises(ValueError, match="too small"):
        gpt.plan_table(32 * 512, [], DISK_GUID)


def test_write_rejects_table_beyond_disk(image: Path) -> None:
    table = write_berth_table()
    with image.open("r+b") as f, pytest.raises(gpt.GptError, match="overlaps the GPT"):
        gpt.write_table(f, GIB, table)
    assert os.path.getsize(image) == DISK_SIZE
