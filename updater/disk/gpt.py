"""GUID Partition Tables: plan, write, read and edit, with the standard library only.

The image builder writes a fresh table into a disk image; the update agent, running on the
device's own Python, rewrites one entry of the live disk to give the inactive slot the UUIDs and
label of the root it just received. Both use this module so that there is one GPT writer.

Layout written (UEFI 2.10, section 5.3): LBA 0 protective MBR, LBA 1 primary header, LBA 2..
the primary entry array (128 entries of 128 bytes), then the partitions, then the backup entry
array and, in the last LBA, the backup header.
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

# Partition types from the Discoverable Partitions Specification (systemd's gpt-auto-generator and
# systemd-veritysetup find the root by these, so no fstab or root= device is needed).
ESP = uuid.UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
ROOT_X86_64 = uuid.UUID("4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709")
ROOT_X86_64_VERITY = uuid.UUID("2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5")
LINUX_GENERIC = uuid.UUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4")
VAR = uuid.UUID("4D21B016-B534-45C2-A9FB-5C16E091FD2D")

# Attribute bits: bit 0 is UEFI's, the others the Discoverable Partitions Specification's.
ATTR_REQUIRED = 1 << 0
ATTR_GROWFS = 1 << 59
ATTR_READ_ONLY = 1 << 60
ATTR_NO_AUTO = 1 << 63

SECTOR_SIZE = 512
ALIGNMENT = 1024 * 1024
ENTRY_COUNT = 128
ENTRY_SIZE = 128
NAME_MAX = 36

_SIGNATURE = b"EFI PART"
_REVISION = 0x00010000
_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_ENTRY = struct.Struct("<16s16sQQQ72s")
_HEADER_CRC_OFFSET = 16
# Bound on the entry array we agree to read, so a corrupt count cannot make us read gigabytes.
_MAX_ARRAY_BYTES = 1024 * 1024
_ROOTHASH = re.compile(r"[0-9a-fA-F]{64}")


class GptError(ValueError):
    """A disk holds no usable GPT, or a table cannot be written as asked."""


@dataclass(frozen=True)
class Partition:
    type_guid: uuid.UUID
    part_guid: uuid.UUID
    first_lba: int
    last_lba: int
    name: str
    attributes: int = 0

    def __post_init__(self) -> None:
        # The on-disk field holds 36 UTF-16 code units; a longer name would be silently cut.
        units = len(self.name.encode("utf-16-le", "surrogatepass")) // 2
        if units > NAME_MAX:
            raise ValueError(
                f"partition name {self.name!r} is {units} UTF-16 units long, at most {NAME_MAX}"
            )
        if "\0" in self.name:
            raise ValueError(f"partition name {self.name!r} contains NUL")
        if self.type_guid.int == 0:
            raise ValueError("partition type GUID must not be nil: nil marks an unused entry")
        if not 0 <= self.first_lba <= self.last_lba:
            raise ValueError(f"partition LBA range {self.first_lba}..{self.last_lba} is invalid")
        if not 0 <= self.attributes < 1 << 64:
            raise ValueError(f"partition attributes {self.attributes:#x} do not fit in 64 bits")

    @property
    def sectors(self) -> int:
        return self.last_lba - self.first_lba + 1

    def size_bytes(self, sector_size: int = SECTOR_SIZE) -> int:
        return self.sectors * sector_size

    def offset_bytes(self, sector_size: int = SECTOR_SIZE) -> int:
        return self.first_lba * sector_size


@dataclass(frozen=True)
class Table:
    """A GPT; `partitions[i]` is partition number i + 1, and only used entries are listed."""

    disk_guid: uuid.UUID
    partitions: tuple[Partition, ...]
    first_usable_lba: int
    last_usable_lba: int
    sector_size: int = SECTOR_SIZE


@dataclass(frozen=True)
class PartitionSpec:
    """One partition to plan: `size` in bytes, or None for the rest of the disk (last one only)."""

    type_guid: uuid.UUID
    name: str
    size: int | None
    part_guid: uuid.UUID


def _array_sectors(sector_size: int) -> int:
    return -(-ENTRY_COUNT * ENTRY_SIZE // sector_size)


def _last_lba(disk_size: int, sector_size: int) -> int:
    return disk_size // sector_size - 1


def _check_sector_size(sector_size: int) -> None:
    if sector_size < 512 or sector_size & (sector_size - 1):
        raise ValueError(f"sector size {sector_size} is not a power of two of at least 512")


def usable_range(disk_size: int, sector_size: int = SECTOR_SIZE) -> tuple[int, int]:
    """First and last LBA that partitions may use on a disk of this size, for a 128-entry GPT."""
    _check_sector_size(sector_size)
    array = _array_sectors(sector_size)
    first = 2 + array
    last = _last_lba(disk_size, sector_size) - 1 - array
    if last < first:
        raise ValueError(f"a disk of {disk_size} bytes is too small for a GPT")
    return first, last


def plan_table(
    disk_size: int,
    sizes: Sequence[PartitionSpec],
    disk_guid: uuid.UUID,
    sector_size: int = SECTOR_SIZE,
) -> Table:
    """Lay partitions out in order, each starting on a 1 MiB boundary, the first at 1 MiB.

    Sizes are rounded up to whole MiB so that slots keep their boundaries when the same plan is
    made with slightly different payload sizes; a None size takes everything up to the last
    usable LBA.
    """
    first_usable, last_usable = usable_range(disk_size, sector_size)
    align = ALIGNMENT // sector_size
    lba = max(align, -(-first_usable // align) * align)
    partitions: list[Partition] = []
    for number, spec in enumerate(sizes, start=1):
        if spec.size is None:
            if number != len(sizes):
                raise ValueError(
                    f"partition {number} ({spec.name!r}) has no size but is not the last one"
                )
            last = last_usable
        else:
            if spec.size <= 0:
                raise ValueError(f"partition {number} ({spec.name!r}) has size {spec.size}")
            last = lba + -(-spec.size // ALIGNMENT) * align - 1
        if last > last_usable or last < lba:
            raise ValueError(
                f"partition {number} ({spec.name!r}) does not fit on a disk of {disk_size} bytes"
            )
        partitions.append(Partition(spec.type_guid, spec.part_guid, lba, last, spec.name))
        lba = last + 1 + (-(last + 1) % align)
    table = Table(disk_guid, tuple(partitions), first_usable, last_usable, sector_size)
    _check_table(table, disk_size)
    return table


def _check_table(table: Table, disk_size: int) -> None:
    ss = table.sector_size
    _check_sector_size(ss)
    first, last = usable_range(disk_size, ss)
    if table.first_usable_lba < first or table.last_usable_lba > last:
        raise GptError(
            f"usable range {table.first_usable_lba}..{table.last_usable_lba} overlaps the GPT "
            f"structures of a disk of {disk_size} bytes (allowed {first}..{last})"
        )
    if len(table.partitions) > ENTRY_COUNT:
        raise GptError(f"{len(table.partitions)} partitions, a GPT holds {ENTRY_COUNT}")
    seen: dict[uuid.UUID, int] = {}
    by_start = sorted(enumerate(table.partitions, start=1), key=lambda np: np[1].first_lba)
    for (number, part), following in zip(by_start, [*by_start[1:], None], strict=True):
        if part.first_lba < table.first_usable_lba or part.last_lba > table.last_usable_lba:
            raise GptError(
                f"partition {number} ({part.first_lba}..{part.last_lba}) lies outside the usable "
                f"range {table.first_usable_lba}..{table.last_usable_lba}"
            )
        if following is not None and following[1].first_lba <= part.last_lba:
            raise GptError(f"partitions {number} and {following[0]} overlap")
        if part.part_guid in seen:
            raise GptError(
                f"partitions {seen[part.part_guid]} and {number} share the UUID {part.part_guid}"
            )
        seen[part.part_guid] = number


def _encode_entries(partitions: Sequence[Partition]) -> bytes:
    array = bytearray(ENTRY_COUNT * ENTRY_SIZE)
    for i, part in enumerate(partitions):
        name = part.name.encode("utf-16-le", "surrogatepass")
        _ENTRY.pack_into(
            array,
            i * ENTRY_SIZE,
            part.type_guid.bytes_le,
            part.part_guid.bytes_le,
            part.first_lba,
            part.last_lba,
            part.attributes,
            name,
        )
    return bytes(array)


def _encode_header(
    table: Table, my_lba: int, alternate_lba: int, entries_lba: int, entries_crc: int
) -> bytes:
    fields = (
        _SIGNATURE,
        _REVISION,
        _HEADER.size,
        0,
        0,
        my_lba,
        alternate_lba,
        table.first_usable_lba,
        table.last_usable_lba,
        table.disk_guid.bytes_le,
        entries_lba,
        ENTRY_COUNT,
        ENTRY_SIZE,
        entries_crc,
    )
    crc = zlib.crc32(_HEADER.pack(*fields))
    header = _HEADER.pack(*fields[:3], crc, *fields[4:])
    return header.ljust(table.sector_size, b"\0")


def _protective_mbr(disk_size: int, sector_size: int) -> bytes:
    sectors = min(disk_size // sector_size - 1, 0xFFFFFFFF)
    # status, CHS start (0/0/2 = LBA 1), type 0xEE, CHS end "not representable", LBA 1, length.
    record = struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1, sectors)
    mbr = bytes(446) + record + bytes(48) + b"\x55\xaa"
    return mbr.ljust(sector_size, b"\0")


def _sync(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())


def _write_copies(f: BinaryIO, disk_size: int, table: Table, *, mbr: bool) -> None:
    _check_table(table, disk_size)
    ss = table.sector_size
    entries = _encode_entries(table.partitions)
    crc = zlib.crc32(entries)
    last_lba = _last_lba(disk_size, ss)
    backup_entries_lba = last_lba - _array_sectors(ss)

    # Backup first and synced before the primary is touched: a crash at any point leaves at
    # least one complete, CRC-valid copy, and read_table falls back to the backup.
    f.seek(backup_entries_lba * ss)
    f.write(entries)
    f.seek(last_lba * ss)
    f.write(_encode_header(table, last_lba, 1, backup_entries_lba, crc))
    _sync(f)

    if mbr:
        f.seek(0)
        f.write(_protective_mbr(disk_size, ss))
    f.seek(2 * ss)
    f.write(entries)
    f.seek(ss)
    f.write(_encode_header(table, 1, last_lba, 2, crc))
    _sync(f)


def write_table(f: BinaryIO, disk_size: int, table: Table) -> None:
    """Write protective MBR, backup and primary GPT to an image file or block device, synced."""
    _write_copies(f, disk_size, table, mbr=True)


def device_size(f: BinaryIO) -> int:
    """Size in bytes of an open image file or block device (seeking to the end works for both)."""
    position = f.tell()
    try:
        return f.seek(0, os.SEEK_END)
    finally:
        f.seek(position)


def _read_at(f: BinaryIO, offset: int, length: int) -> bytes:
    f.seek(offset)
    data = f.read(length)
    if len(data) != length:
        raise GptError(f"short read: {len(data)} of {length} bytes at offset {offset}")
    return data


def _read_copy(f: BinaryIO, lba: int, disk_size: int, sector_size: int) -> Table:
    """Parse and validate the header at `lba` and its entry array, or raise GptError why not."""
    last_lba = _last_lba(disk_size, sector_size)
    if not 1 <= lba <= last_lba:
        raise GptError(f"LBA {lba} is outside a disk of {disk_size} bytes")
    raw = _read_at(f, lba * sector_size, sector_size)
    (
        signature,
        _revision,
        header_size,
        header_crc,
        _reserved,
        my_lba,
        _alternate_lba,
        first_usable,
        last_usable,
        disk_guid,
        entries_lba,
        entry_count,
        entry_size,
        entries_crc,
    ) = _HEADER.unpack_from(raw)
    if signature != _SIGNATURE:
        raise GptError("no GPT signature")
    if not _HEADER.size <= header_size <= sector_size:
        raise GptError(f"header size {header_size} is invalid")
    zeroed = bytearray(raw[:header_size])
    zeroed[_HEADER_CRC_OFFSET : _HEADER_CRC_OFFSET + 4] = bytes(4)
    if zlib.crc32(zeroed) != header_crc:
        raise GptError("header CRC mismatch")
    if my_lba != lba:
        raise GptError(f"header at LBA {lba} says it is at LBA {my_lba}")
    if entry_size < ENTRY_SIZE or entry_size & (entry_size - 1):
        raise GptError(f"entry size {entry_size} is invalid")
    array_bytes = entry_count * entry_size
    if array_bytes > _MAX_ARRAY_BYTES:
        raise GptError(f"entry array of {entry_count} x {entry_size} bytes is implausibly large")
    array_end = entries_lba + -(-array_bytes // sector_size) - 1
    if entries_lba < 2 or array_end > last_lba:
        raise GptError(f"entry array at LBA {entries_lba} lies outside the disk")
    if not first_usable <= last_usable + 1 or last_usable > last_lba:
        raise GptError(f"usable range {first_usable}..{last_usable} is invalid")
    array = _read_at(f, entries_lba * sector_size, array_bytes)
    if zlib.crc32(array) != entries_crc:
        raise GptError("entry array CRC mismatch")

    partitions: list[Partition] = []
    gap: int | None = None
    for index in range(entry_count):
        type_le, part_le, first, last, attributes, name_raw = _ENTRY.unpack_from(
            array, index * entry_size
        )
        if type_le == bytes(16):
            gap = index + 1 if gap is None else gap
            continue
        if gap is not None:
            # Table.partitions maps index to partition number; compacting would make
            # update_partition edit the wrong entry, so refuse instead.
            raise GptError(f"entry {gap} is unused but entry {index + 1} is used")
        units = [name_raw[i : i + 2] for i in range(0, len(name_raw), 2)]
        end = units.index(b"\0\0") if b"\0\0" in units else len(units)
        name = b"".join(units[:end]).decode("utf-16-le", "surrogatepass")
        try:
            partitions.append(
                Partition(
                    uuid.UUID(bytes_le=type_le),
                    uuid.UUID(bytes_le=part_le),
                    first,
                    last,
                    name,
                    attributes,
                )
            )
        except ValueError as e:
            raise GptError(f"entry {index + 1}: {e}") from e
    return Table(
        uuid.UUID(bytes_le=disk_guid), tuple(partitions), first_usable, last_usable, sector_size
    )


def read_table(f: BinaryIO, disk_size: int | None = None, sector_size: int = SECTOR_SIZE) -> Table:
    """Read the primary GPT, or the backup in the last LBA when the primary is damaged."""
    _check_sector_size(sector_size)
    if disk_size is None:
        disk_size = device_size(f)
    if disk_size < 3 * sector_size:
        raise GptError(f"no valid GPT header: a disk of {disk_size} bytes is too small")
    try:
        return _read_copy(f, 1, disk_size, sector_size)
    except GptError as e:
        primary_error = e
    backup_lba = _last_lba(disk_size, sector_size)
    try:
        return _read_copy(f, backup_lba, disk_size, sector_size)
    except GptError as backup_error:
        raise GptError(
            f"no valid GPT header: primary header (LBA 1): {primary_error}; "
            f"backup header (LBA {backup_lba}): {backup_error}"
        ) from None


def update_partition(
    f: BinaryIO,
    index: int,
    *,
    part_guid: uuid.UUID | None = None,
    name: str | None = None,
    type_guid: uuid.UUID | None = None,
    sector_size: int = SECTOR_SIZE,
) -> Table:
    """Change one entry (0-based `index`) of the table on `f` and rewrite both copies.

    The MBR is left alone: only the GPT structures change, and each copy is rewritten only
    after the other is complete on disk. The backup is moved to the current end of the disk,
    which repairs a table on a disk that has grown since it was written.
    """
    disk_size = device_size(f)
    table = read_table(f, disk_size, sector_size)
    if not 0 <= index < len(table.partitions):
        raise IndexError(f"partition index {index} not in a table of {len(table.partitions)}")
    old = table.partitions[index]
    new = dataclasses.replace(
        old,
        part_guid=old.part_guid if part_guid is None else part_guid,
        name=old.name if name is None else name,
        type_guid=old.type_guid if type_guid is None else type_guid,
    )
    parts = list(table.partitions)
    parts[index] = new
    table = dataclasses.replace(table, partitions=tuple(parts))
    _write_copies(f, disk_size, table, mbr=False)
    return table


def uuid_pair_from_roothash(roothash_hex: str) -> tuple[uuid.UUID, uuid.UUID]:
    """Partition UUIDs (data, verity) that systemd expects for a dm-verity root hash.

    systemd takes the first 128 bits of the hash as the data partition's UUID and the last 128
    bits as the hash partition's, byte for byte in the order written, with no version bits set.
    """
    if not _ROOTHASH.fullmatch(roothash_hex):
        raise ValueError(f"root hash must be 64 hex digits, got {roothash_hex!r}")
    digest = bytes.fromhex(roothash_hex)
    return uuid.UUID(bytes=digest[:16]), uuid.UUID(bytes=digest[16:])
