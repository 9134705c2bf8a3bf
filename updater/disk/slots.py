"""The A/B root slots of a Berth disk: which is which, which is booted, how one is rewritten.

A slot is a pair of partitions: root data (erofs) and its dm-verity hash tree. What a slot holds
is written in the GPT itself, so that no state file can disagree with the disk:

- the labels say the version (`berth_<version>`, `berth_<version>_verity`), or `_empty` (never
  written), or `_writing` (being rewritten: contents are garbage);
- the partition UUIDs are the two halves of the verity root hash. A UKI boots the root whose hash
  its command line names (systemd-veritysetup-generator looks the partitions up by these UUIDs),
  so a slot whose UUIDs are random cannot be booted by any UKI, old or new.

Rewriting a slot is therefore: `prepare_slot` (random UUIDs, `_writing`) before the first byte is
written, then the data, then `commit_slot` (UUIDs from the root hash, version labels) only after
the data is flushed and verified. A crash anywhere in between leaves a slot that reads as
`writing` and that nothing boots.

Runs on the device: standard library only.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO, cast

from updater import run
from updater.disk import gpt, verity
from updater.errors import SlotError, ToolMissing, VerificationError
from updater.release.version import Version

EMPTY_LABEL = "_empty"
WRITING_LABEL = "_writing"
LABEL_PREFIX = "berth_"
VERITY_SUFFIX = "_verity"
# What each payload file of a release is written into (manifest.PAYLOAD_FILES names).
DATA_FILE = "root.erofs"
VERITY_FILE = "root.verity"
# veritysetup verify reads all of the data and the tree: allow for a slow disk (an SD card reads
# some 20 MB/s) at a quarter of that speed, on top of a fixed start-up allowance.
VERIFY_TIMEOUT = 60.0
VERIFY_MIN_RATE = 5 << 20

_HEX64 = re.compile(r"[0-9a-f]{64}")


class SlotName(StrEnum):
    A = "A"
    B = "B"


class SlotState(StrEnum):
    EMPTY = "empty"  # never written since the disk was made
    WRITING = "writing"  # prepare_slot ran and commit_slot did not: garbage, bootable by nothing
    INSTALLED = "installed"  # holds a version; its UUIDs carry that version's root hash
    UNKNOWN = "unknown"  # labels Berth never writes together: treat as garbage


@dataclass(frozen=True)
class Slot:
    """One slot as the GPT describes it; partition numbers are 1-based, as Linux names them."""

    name: SlotName
    data_number: int
    verity_number: int
    data: gpt.Partition
    verity: gpt.Partition
    sector_size: int = gpt.SECTOR_SIZE

    @property
    def version(self) -> Version | None:
        """The installed version, or None unless the slot is installed."""
        label = self.data.name
        if not label.startswith(LABEL_PREFIX):
            return None
        try:
            version = Version.parse(label.removeprefix(LABEL_PREFIX))
        except ValueError:
            return None
        if self.verity.name != verity_label(version):
            return None
        return version

    @property
    def state(self) -> SlotState:
        labels = {self.data.name, self.verity.name}
        if WRITING_LABEL in labels:
            return SlotState.WRITING
        if labels == {EMPTY_LABEL}:
            return SlotState.EMPTY
        if self.version is not None:
            return SlotState.INSTALLED
        return SlotState.UNKNOWN

    @property
    def roothash(self) -> str:
        """The root hash a UKI's `roothash=` must name to boot this slot (from the UUIDs)."""
        return self.data.part_guid.hex + self.verity.part_guid.hex

    @property
    def data_offset(self) -> int:
        return self.data.offset_bytes(self.sector_size)

    @property
    def data_size(self) -> int:
        return self.data.size_bytes(self.sector_size)

    @property
    def verity_offset(self) -> int:
        return self.verity.offset_bytes(self.sector_size)

    @property
    def verity_size(self) -> int:
        return self.verity.size_bytes(self.sector_size)


def data_label(version: Version) -> str:
    return f"{LABEL_PREFIX}{version}"


def verity_label(version: Version) -> str:
    return f"{LABEL_PREFIX}{version}{VERITY_SUFFIX}"


def _read_table(disk: BinaryIO) -> gpt.Table:
    try:
        return gpt.read_table(disk)
    except (gpt.GptError, OSError) as e:
        raise SlotError(
            f"cannot read the slots: the disk's partition table is unusable: {e}"
        ) from e


def _slots_of(table: gpt.Table) -> tuple[Slot, Slot]:
    def numbers(type_guid: uuid.UUID) -> list[int]:
        return [n for n, p in enumerate(table.partitions, start=1) if p.type_guid == type_guid]

    data, verity = numbers(gpt.ROOT_X86_64), numbers(gpt.ROOT_X86_64_VERITY)
    if len(data) != 2 or len(verity) != 2:
        raise SlotError(
            f"refused: not a Berth A/B disk: expected 2 root-x86-64 and 2 root-x86-64-verity "
            f"partitions, found {len(data)} and {len(verity)}"
        )
    a, b = (
        Slot(
            name,
            d,
            v,
            table.partitions[d - 1],
            table.partitions[v - 1],
            table.sector_size,
        )
        for name, d, v in zip(SlotName, data, verity, strict=True)
    )
    return a, b


def read_slots(disk: BinaryIO) -> tuple[Slot, Slot]:
    """Slots A and B of a disk (block device or image file), in partition table order."""
    return _slots_of(_read_table(disk))


def parse_cmdline_roothash(cmdline: str) -> str:
    """The `roothash=` of a kernel command line (the one the booted UKI carries)."""
    found = [
        arg.removeprefix("roothash=") for arg in cmdline.split() if arg.startswith("roothash=")
    ]
    if not found:
        raise SlotError("the kernel command line has no roothash=: this is not a booted Berth root")
    roothash = found[-1].lower()  # the kernel and systemd both take the last one
    if not _HEX64.fullmatch(roothash):
        raise SlotError(f"the kernel command line's roothash={found[-1]!r} is not 64 hex digits")
    return roothash


def booted_roothash(cmdline: Path = Path("/proc/cmdline")) -> str:
    return parse_cmdline_roothash(cmdline.read_text(encoding="utf-8", errors="replace"))


def booted_slot(slots: tuple[Slot, Slot], roothash: str) -> Slot:
    """The slot the running system booted from, named by the command line's root hash."""
    for slot in slots:
        if slot.roothash == roothash.lower():
            return slot
    raise SlotError(
        f"neither slot holds the booted root hash {roothash} "
        f"(A: {slots[0].roothash}, B: {slots[1].roothash})"
    )


def inactive_slot(slots: tuple[Slot, Slot], roothash: str) -> Slot:
    """The slot an update may overwrite: the one the running system did not boot from."""
    booted = booted_slot(slots, roothash)
    return slots[1] if booted is slots[0] else slots[0]


def _current(disk: BinaryIO, slot: Slot) -> tuple[Slot, Slot]:
    """Re-read the slot (and the other one) from disk, refusing if the layout has changed."""
    pair = read_slots(disk)
    now = pair[0] if pair[0].name == slot.name else pair[1]
    if (now.data_number, now.verity_number, now.data.first_lba, now.verity.first_lba) != (
        slot.data_number,
        slot.verity_number,
        slot.data.first_lba,
        slot.verity.first_lba,
    ):
        raise SlotError(f"refused: slot {slot.name}'s partitions moved since they were read")
    return (now, pair[1] if now is pair[0] else pair[0])


def _update(disk: BinaryIO, number: int, part_guid: uuid.UUID, name: str) -> None:
    try:
        gpt.update_partition(disk, number - 1, part_guid=part_guid, name=name)
    except (gpt.GptError, OSError, ValueError) as e:
        raise SlotError(f"refused: rewriting partition {number}'s entry failed: {e}") from e


def prepare_slot(disk: BinaryIO, slot: Slot, *, booted: str | None = None) -> Slot:
    """Mark `slot` as being written, before any of its data is touched.

    Random UUIDs detach it from every root hash (an old UKI naming the old contents can no longer
    find it) and `_writing` labels say why. The data partition goes first: from the first table
    write on, the pair matches no root hash. `booted` (the command line's root hash) is a guard
    against overwriting the running root.
    """
    current, _other = _current(disk, slot)
    if booted is not None and current.roothash == booted.lower():
        raise SlotError(f"refused to overwrite slot {slot.name}: the running system booted from it")
    _update(disk, slot.data_number, uuid.uuid4(), WRITING_LABEL)
    _update(disk, slot.verity_number, uuid.uuid4(), WRITING_LABEL)
    return _current(disk, slot)[0]


def commit_slot(disk: BinaryIO, slot: Slot, version: Version, roothash: str) -> Slot:
    """Name a written, flushed and verified slot: UUIDs from `roothash`, labels from `version`.

    The verity partition goes first and the data partition last: until the last table write the
    data label still reads `_writing`, so a crash in between leaves a slot that reads as garbage.
    """
    roothash = roothash.lower()
    if not _HEX64.fullmatch(roothash):
        raise SlotError(f"refused to commit slot {slot.name}: root hash {roothash!r} is not 64 hex")
    label, vlabel = data_label(version), verity_label(version)
    if len(vlabel.encode("utf-16-le")) // 2 > gpt.NAME_MAX:
        raise SlotError(
            f"refused to commit slot {slot.name}: label {vlabel!r} is longer than the "
            f"{gpt.NAME_MAX} characters a GPT entry holds"
        )
    current, other = _current(disk, slot)
    if current.state is not SlotState.WRITING:
        raise SlotError(
            f"refused to commit slot {slot.name}: it is {current.state}, not writing "
            "(prepare_slot must run before its data is written)"
        )
    if other.roothash == roothash:
        raise SlotError(
            f"refused to commit slot {slot.name}: slot {other.name} already holds root hash "
            f"{roothash} (version {other.version})"
        )
    data_uuid, verity_uuid = gpt.uuid_pair_from_roothash(roothash)
    _update(disk, slot.verity_number, verity_uuid, vlabel)
    _update(disk, slot.data_number, data_uuid, label)
    return _current(disk, slot)[0]


def _human(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def check_space(slot: Slot, sizes: Mapping[str, int]) -> None:
    """Refuse payload files (`root.erofs`, `root.verity` -> size in bytes) that do not fit."""
    room = {DATA_FILE: slot.data_size, VERITY_FILE: slot.verity_size}
    for name, size in sizes.items():
        if name not in room:
            raise ValueError(f"{name!r} is not written into a slot (only {', '.join(room)})")
        if size > room[name]:
            part = "" if name == DATA_FILE else "'s verity partition"
            raise SlotError(
                f"refused: {name} is {_human(size)} but slot {slot.name}{part} holds "
                f"{_human(room[name])} ({size} > {room[name]} bytes)"
            )


def verity_data_size(disk: BinaryIO, slot: Slot) -> int:
    """The data size the slot's verity superblock covers (blocks × block size).

    Used to re-verify an installed slot. Trusting the superblock for the size is sound: the
    geometry of the hash tree follows from it, so a changed count yields another root hash.
    """
    return verity.read_superblock(disk.fileno(), slot.verity_offset, f"slot {slot.name}").data_size


def _check_superblock(hash_path: Path, hash_offset: int, data_size: int) -> None:
    where = f"{hash_path} at offset {hash_offset}"
    try:
        fd = os.open(hash_path, os.O_RDONLY)
    except OSError as e:
        raise VerificationError(f"refused: cannot read the verity superblock: {e}") from e
    try:
        verity.read_superblock(fd, hash_offset, where).check(data_size, where)
    finally:
        os.close(fd)


def verify_verity(
    data_path: Path, hash_path: Path, roothash: str, data_size: int, *, hash_offset: int = 0
) -> None:
    """Check every data block against the hash tree and the tree against `roothash`.

    Runs `veritysetup verify` (what systemd-veritysetup would do lazily at boot, done up front):
    the data must start at offset 0 of `data_path`; the tree may start at `hash_offset`.
    """
    _check_superblock(hash_path, hash_offset, data_size)
    try:
        result = run.run(
            [
                "veritysetup",
                "verify",
                f"--hash-offset={hash_offset}",
                os.fspath(data_path),
                os.fspath(hash_path),
                roothash,
            ],
            timeout=VERIFY_TIMEOUT + data_size / VERIFY_MIN_RATE,
            check=False,
        )
    except ToolMissing as e:
        raise SlotError(f"cannot verify the slot: {e} (package cryptsetup-bin)") from e
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).decode(errors="replace").strip()
        raise VerificationError(
            f"refused: {data_path} does not verify against root hash {roothash}: "
            f"veritysetup exit status {result.returncode}: {detail}"
        )


def _copy_range(src: BinaryIO, offset: int, size: int, dest: Path) -> None:
    with dest.open("wb") as out:
        src.seek(offset)
        left = size
        while left:
            block = src.read(min(left, 1 << 20))
            if not block:
                raise SlotError(f"short read at offset {offset + size - left} while verifying")
            out.write(block)
            left -= len(block)


def verify_slot(disk: Path, slot: Slot, roothash: str, data_size: int) -> None:
    """verify_verity on a slot of a disk: its partition nodes on a block device.

    An image file (the tests, the builder) has no partition nodes and veritysetup takes no data
    offset, so the slot's two partitions are copied out to a temporary directory first.
    """
    if stat.S_ISBLK(disk.stat().st_mode):
        verify_verity(
            partition_path(disk, slot.data_number),
            partition_path(disk, slot.verity_number),
            roothash,
            data_size,
        )
        return
    with tempfile.TemporaryDirectory(prefix="berth-verify-") as tmp, disk.open("rb") as f:
        data, tree = Path(tmp) / "data", Path(tmp) / "verity"
        _copy_range(f, slot.data_offset, data_size, data)
        _copy_range(f, slot.verity_offset, slot.verity_size, tree)
        verify_verity(data, tree, roothash, data_size)


def find_boot_disk(roothash: str, *, dev: Path = Path("/dev"), sys: Path = Path("/sys")) -> Path:
    """The disk holding the root partition that `roothash` names (the booted one), e.g. /dev/vda."""
    data_uuid, _ = gpt.uuid_pair_from_roothash(roothash.lower())
    link = dev / "disk/by-partuuid" / str(data_uuid)
    if not link.exists():
        raise SlotError(f"no partition with UUID {data_uuid} (from the booted root hash) in {link}")
    part = link.resolve().name
    node = (sys / "class/block" / part).resolve()
    if not (node / "partition").exists():
        raise SlotError(f"{link} points at {part}, which is not a partition")
    return dev / node.parent.name


def partition_path(
    disk: Path, number: int, *, dev: Path = Path("/dev"), sys: Path = Path("/sys")
) -> Path:
    """The device node of partition `number` of `disk`, as the kernel names it (vda2, nvme0n1p2)."""
    node = (sys / "class/block" / disk.name).resolve()
    try:
        children = sorted(node.iterdir())
    except OSError as e:
        raise SlotError(f"cannot list the partitions of {disk}: {e}") from e
    for child in children:
        marker = child / "partition"
        if marker.is_file() and marker.read_text().strip() == str(number):
            return dev / child.name
    raise SlotError(f"{disk} has no partition {number} known to the kernel")


@contextlib.contextmanager
def open_partition(
    disk: Path, number: int, partition: gpt.Partition, mode: str = "r+b"
) -> Iterator[tuple[BinaryIO, int]]:
    """A partition opened for writing (or as `mode` says), and the offset its first byte has in
    that file.

    On a device the kernel's partition node (offset 0): writes cannot stray outside it. On a disk
    image file (tests, images prepared offline) the whole file at the partition's offset.
    """
    if stat.S_ISBLK(disk.stat().st_mode):
        with partition_path(disk, number).open(mode) as f:
            yield cast(BinaryIO, f), 0
    else:
        with disk.open(mode) as f:
            yield cast(BinaryIO, f), partition.offset_bytes()
