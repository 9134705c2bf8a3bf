"""updater.disk.slots on a sparse disk in Berth's layout, checked by sfdisk and veritysetup."""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from builder.run import run
from updater.disk import gpt, slots
from updater.disk.slots import Slot, SlotName, SlotState
from updater.errors import SlotError, VerificationError
from updater.release.version import Version

MiB = 1 << 20
ROOTHASH_A = "00112233445566778899aabbccddeeff0123456789abcdeffedcba9876543210"
ROOTHASH_B = "ffeeddccbbaa99887766554433221100fedcba98765432100123456789abcdef"
VERITYSETUP = "/usr/sbin/veritysetup"


def make_image(path: Path) -> gpt.Table:
    """The layout of builder.disk.berth_layout, small: A holds 1.0.0, B is empty."""
    data_a, verity_a = gpt.uuid_pair_from_roothash(ROOTHASH_A)
    specs = [
        gpt.PartitionSpec(gpt.ESP, "ESP", 4 * MiB, uuid.UUID(int=0xE5)),
        gpt.PartitionSpec(gpt.ROOT_X86_64, "berth_1.0.0", 8 * MiB, data_a),
        gpt.PartitionSpec(gpt.ROOT_X86_64_VERITY, "berth_1.0.0_verity", 1 * MiB, verity_a),
        gpt.PartitionSpec(gpt.ROOT_X86_64, "_empty", 8 * MiB, uuid.UUID(int=0xB1)),
        gpt.PartitionSpec(gpt.ROOT_X86_64_VERITY, "_empty", 1 * MiB, uuid.UUID(int=0xB2)),
        gpt.PartitionSpec(gpt.LINUX_GENERIC, "STATE", None, uuid.UUID(int=0x57)),
    ]
    size = 32 * MiB
    table = gpt.plan_table(size, specs, uuid.UUID(int=0xD15C))
    with path.open("wb") as f:
        f.truncate(size)
        gpt.write_table(f, size, table)
    return table


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    make_image(path)
    return path


def sfdisk(path: Path) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = json.loads(run(["sfdisk", "--json", path], capture=True).stdout)[
        "partitiontable"
    ]["partitions"]
    return parts


def read(image: Path) -> tuple[Slot, Slot]:
    with image.open("rb") as f:
        return slots.read_slots(f)


def test_read_slots_of_a_fresh_disk(image: Path) -> None:
    a, b = read(image)
    assert (a.name, a.data_number, a.verity_number) == (SlotName.A, 2, 3)
    assert (b.name, b.data_number, b.verity_number) == (SlotName.B, 4, 5)
    assert a.state is SlotState.INSTALLED and a.version == Version(1, 0, 0)
    assert a.roothash == ROOTHASH_A
    assert b.state is SlotState.EMPTY and b.version is None
    assert (b.data_size, b.verity_size) == (8 * MiB, 1 * MiB)
    assert b.data_offset == sfdisk(image)[3]["start"] * 512


def test_booted_and_inactive(image: Path) -> None:
    pair = read(image)
    assert slots.booted_slot(pair, ROOTHASH_A.upper()) is pair[0]
    assert slots.inactive_slot(pair, ROOTHASH_A) is pair[1]
    with pytest.raises(SlotError, match=f"neither slot holds the booted root hash {ROOTHASH_B}"):
        slots.inactive_slot(pair, ROOTHASH_B)


def test_cmdline_roothash(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"console=ttyS0 roothash={ROOTHASH_A} quiet\n")
    assert slots.booted_roothash(cmdline) == ROOTHASH_A
    with pytest.raises(SlotError, match="no roothash="):
        slots.parse_cmdline_roothash("console=ttyS0 root=/dev/vda2")
    with pytest.raises(SlotError, match="not 64 hex digits"):
        slots.parse_cmdline_roothash("roothash=abc")


def test_not_a_berth_disk(tmp_path: Path) -> None:
    path = tmp_path / "other.raw"
    size = 8 * MiB
    table = gpt.plan_table(
        size,
        [gpt.PartitionSpec(gpt.LINUX_GENERIC, "data", None, uuid.UUID(int=1))],
        uuid.UUID(int=2),
    )
    with path.open("wb") as f:
        f.truncate(size)
        gpt.write_table(f, size, table)
    with pytest.raises(SlotError, match="found 0 and 0"):
        read(path)
    path.write_bytes(bytes(size))
    with pytest.raises(SlotError, match="partition table is unusable"):
        read(path)


def test_prepare_then_commit_round_trip(image: Path) -> None:
    _, b = read(image)
    with image.open("r+b") as f:
        writing = slots.prepare_slot(f, b, booted=ROOTHASH_A)
    assert writing.state is SlotState.WRITING and writing.version is None
    parts = sfdisk(image)
    assert [p["name"] for p in parts[3:5]] == ["_writing", "_writing"]
    # Fresh random UUIDs: the old contents' root hash no longer finds this slot.
    assert {uuid.UUID(p["uuid"]).int for p in parts[3:5]}.isdisjoint({0xB1, 0xB2})

    with image.open("r+b") as f:
        done = slots.commit_slot(f, writing, Version(1, 1, 0), ROOTHASH_B)
    assert done.state is SlotState.INSTALLED
    assert done.version == Version(1, 1, 0) and done.roothash == ROOTHASH_B
    parts = sfdisk(image)
    assert [p["name"] for p in parts[3:5]] == ["berth_1.1.0", "berth_1.1.0_verity"]
    data_uuid, verity_uuid = gpt.uuid_pair_from_roothash(ROOTHASH_B)
    assert [uuid.UUID(p["uuid"]) for p in parts[3:5]] == [data_uuid, verity_uuid]
    # Slot A and the rest of the table are untouched.
    assert [p["name"] for p in parts[:3]] == ["ESP", "berth_1.0.0", "berth_1.0.0_verity"]
    assert read(image)[0].roothash == ROOTHASH_A
    result = run(["sfdisk", "--verify", image], capture=True)
    assert b"No errors detected" in result.stdout


def test_refusals_leave_the_table_byte_identical(image: Path) -> None:
    a, b = read(image)
    before = image.read_bytes()
    with image.open("r+b") as f:
        with pytest.raises(SlotError, match="refused to overwrite slot A: the running system"):
            slots.prepare_slot(f, a, booted=ROOTHASH_A)
        with pytest.raises(SlotError, match="it is empty, not writing"):
            slots.commit_slot(f, b, Version(1, 1, 0), ROOTHASH_B)
        with pytest.raises(SlotError, match="is not 64 hex"):
            slots.commit_slot(f, b, Version(1, 1, 0), "1234")
        with pytest.raises(SlotError, match="longer than the 36 characters"):
            slots.commit_slot(f, b, Version(123456789, 123456789, 123456789), ROOTHASH_B)
    assert image.read_bytes() == before


def test_commit_refuses_the_other_slots_roothash(image: Path) -> None:
    _, b = read(image)
    with image.open("r+b") as f:
        writing = slots.prepare_slot(f, b)
        before = image.read_bytes()
        with pytest.raises(SlotError, match="slot A already holds root hash"):
            slots.commit_slot(f, writing, Version(1, 0, 0), ROOTHASH_A)
    assert image.read_bytes() == before


@pytest.mark.parametrize("step", ["prepare", "commit"])
def test_a_crash_between_the_two_entries_never_looks_installed(
    image: Path, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, b = read(image)
    if step == "commit":
        with image.open("r+b") as f:
            b = slots.prepare_slot(f, b)
    real = gpt.update_partition
    calls: list[int] = []

    def crash_on_second(f: Any, index: int, **kw: Any) -> gpt.Table:
        calls.append(index)
        if len(calls) == 2:
            raise OSError("power lost")
        return real(f, index, **kw)

    monkeypatch.setattr(gpt, "update_partition", crash_on_second)
    with image.open("r+b") as f, pytest.raises(SlotError, match="power lost"):
        if step == "prepare":
            slots.prepare_slot(f, b)
        else:
            slots.commit_slot(f, b, Version(1, 1, 0), ROOTHASH_B)
    half = read(image)[1]
    assert half.state is SlotState.WRITING
    assert half.roothash not in (ROOTHASH_B, f"{0xB1:032x}{0xB2:032x}")


def test_check_space(image: Path) -> None:
    _, b = read(image)
    slots.check_space(b, {"root.erofs": 8 * MiB, "root.verity": MiB})
    with pytest.raises(
        SlotError,
        match=re.escape("root.erofs is 9.0 MB but slot B holds 8.4 MB (9000000 > 8388608"),
    ):
        slots.check_space(b, {"root.erofs": 9_000_000})
    with pytest.raises(SlotError, match=r"root\.verity is 2\.0 MB but slot B's verity partition"):
        slots.check_space(b, {"root.verity": 2_000_000})
    big = Slot(
        SlotName.B,
        4,
        5,
        gpt.Partition(
            gpt.ROOT_X86_64, uuid.UUID(int=1), 2048, 2048 + 2 * 10**9 // 512 - 1, "_empty"
        ),
        gpt.Partition(gpt.ROOT_X86_64_VERITY, uuid.UUID(int=2), 10**8, 10**8 + 2047, "_empty"),
    )
    with pytest.raises(SlotError, match=r"root\.erofs is 3\.1 GB but slot B holds 2\.0 GB"):
        slots.check_space(big, {"root.erofs": 3_100_000_000})
    with pytest.raises(ValueError, match=r"uki\.efi"):
        slots.check_space(big, {"uki.efi": 1})


def verity_pair(tmp_path: Path, blocks: int = 256) -> tuple[Path, Path, str]:
    data = tmp_path / "root.erofs"
    data.write_bytes(os.urandom(blocks * 4096))
    tree = tmp_path / "root.verity"
    out = run([VERITYSETUP, "format", data, tree], capture=True).stdout.decode()
    match = re.search(r"^Root hash:\s+([0-9a-f]{64})$", out, re.M)
    assert match is not None
    return data, tree, match[1]


def test_verify_verity_accepts_the_real_thing_and_refuses_changes(tmp_path: Path) -> None:
    data, tree, roothash = verity_pair(tmp_path)
    size = data.stat().st_size
    slots.verify_verity(data, tree, roothash, size)
    with pytest.raises(VerificationError, match="does not verify against root hash"):
        slots.verify_verity(data, tree, ROOTHASH_B, size)
    with pytest.raises(VerificationError, match="covers 256 blocks of 4096 bytes, the data is"):
        slots.verify_verity(data, tree, roothash, size - 4096)
    with pytest.raises(VerificationError, match="no verity superblock"):
        slots.verify_verity(data, data, roothash, size)
    with data.open("r+b") as f:
        f.seek(300_000)
        f.write(b"\x01" if f.read(1) != b"\x01" else b"\x02")
    with pytest.raises(VerificationError, match="exit status"):
        slots.verify_verity(data, tree, roothash, size)


def test_verify_verity_with_hash_offset(tmp_path: Path) -> None:
    data, tree, roothash = verity_pair(tmp_path)
    shifted = tmp_path / "shifted"
    shifted.write_bytes(bytes(MiB) + tree.read_bytes())
    slots.verify_verity(data, shifted, roothash, data.stat().st_size, hash_offset=MiB)


def test_install_into_slot_b_and_verify_it(image: Path, tmp_path: Path) -> None:
    data, tree, roothash = verity_pair(tmp_path)
    _, b = read(image)
    slots.check_space(b, {"root.erofs": data.stat().st_size, "root.verity": tree.stat().st_size})
    with image.open("r+b") as f:
        b = slots.prepare_slot(f, b, booted=ROOTHASH_A)
        f.seek(b.data_offset)
        f.write(data.read_bytes())
        f.seek(b.verity_offset)
        f.write(tree.read_bytes())
        f.flush()
        os.fsync(f.fileno())
    slots.verify_slot(image, b, roothash, data.stat().st_size)
    with image.open("r+b") as f:
        b = slots.commit_slot(f, b, Version(1, 1, 0), roothash)
    assert read(image)[1].roothash == roothash
    # The slot's data, not slot A's (all zeros), is what was checked.
    with pytest.raises(VerificationError):
        slots.verify_slot(image, read(image)[0], roothash, data.stat().st_size)


def fake_sysfs(root: Path, disk: str, parts: dict[int, str]) -> tuple[Path, Path]:
    """A /dev and /sys with the links udev and the kernel would make for `disk`'s partitions."""
    dev, sys = root / "dev", root / "sys"
    device = sys / "devices/pci0000:00/0000:00:04.0/virtio1/block" / disk
    (sys / "class/block").mkdir(parents=True)
    (dev / "disk/by-partuuid").mkdir(parents=True)
    device.mkdir(parents=True)
    (sys / "class/block" / disk).symlink_to(device)
    (dev / disk).touch()
    for number, part_uuid in parts.items():
        name = f"{disk}p{number}" if disk[-1].isdigit() else f"{disk}{number}"
        (device / name).mkdir()
        (device / name / "partition").write_text(f"{number}\n")
        (sys / "class/block" / name).symlink_to(device / name)
        (dev / name).touch()
        (dev / "disk/by-partuuid" / part_uuid).symlink_to(f"../../{name}")
    return dev, sys


@pytest.mark.parametrize("disk", ["vda", "nvme0n1"])
def test_find_boot_disk_and_partition_path(tmp_path: Path, disk: str) -> None:
    data_uuid, verity_uuid = gpt.uuid_pair_from_roothash(ROOTHASH_A)
    dev, sys = fake_sysfs(tmp_path, disk, {2: str(data_uuid), 3: str(verity_uuid), 4: "b1"})
    found = slots.find_boot_disk(ROOTHASH_A, dev=dev, sys=sys)
    assert found == dev / disk
    sep = "p" if disk == "nvme0n1" else ""
    assert slots.partition_path(found, 4, dev=dev, sys=sys) == dev / f"{disk}{sep}4"
    with pytest.raises(SlotError, match="has no partition 7"):
        slots.partition_path(found, 7, dev=dev, sys=sys)
    with pytest.raises(SlotError, match="no partition with UUID"):
        slots.find_boot_disk(ROOTHASH_B, dev=dev, sys=sys)
