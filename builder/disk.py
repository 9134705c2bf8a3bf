"""Stage 7: the ESP, the STATE file system and the GPT disk image, without loop devices or mounts.

Each partition is made as a file (mkfs.vfat + mtools for the ESP, the tree's mke2fs -d for STATE)
and copied into a sparse disk image at its offset; the partition table comes from the one GPT
module that the update agent uses too.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from builder.config import ImageConfig
from builder.errors import BuildError
from builder.run import run
from builder.treetool import tree_command
from updater.disk import gpt

MiB = 1 << 20

LOADER_CONF = """\
timeout 0
editor no
auto-entries no
auto-firmware no
console-mode keep
secure-boot-enroll if-safe
"""
# Where systemd-boot looks for the signed key lists it enrols from setup mode by itself: only a
# directory named "auto" is enrolled without a menu choice (`if-safe`: in a virtual machine;
# on bare metal the menu entry "Enroll Secure Boot keys: auto" does it, see docs/platforms.md).
ENROLMENT_DIR = "loader/keys/auto"


def stable_uuid(seed: str, role: str) -> uuid.UUID:
    """A UUID that depends only on `seed` and `role`: rebuilding a version gives the same disk."""
    return uuid.UUID(bytes=hashlib.sha256(f"berth:{seed}:{role}".encode()).digest()[:16], version=4)


def uki_name(version: str) -> str:
    return f"berth_{version}.efi"


SYSTEMD_BOOT = "usr/lib/systemd/boot/efi/systemd-bootx64.efi"  # in the image tree


def make_esp(
    boot: Path,
    uki: Path,
    version: str,
    size: int,
    output: Path,
    seed: str,
    enrolment: Sequence[Path] = (),
) -> None:
    """A FAT32 ESP with systemd-boot (`boot`, signed; no menu delay, editor off), the version's
    UKI and the Secure Boot key lists to enrol (`enrolment`: the .auth files, copied as named)."""
    output.unlink(missing_ok=True)
    with output.open("wb") as f:
        f.truncate(size)
    volume_id = stable_uuid(seed, "esp-volume").hex[:8]
    env = {"SOURCE_DATE_EPOCH": "0", "MTOOLS_SKIP_CHECK": "1"}
    run(
        ["mkfs.vfat", "-F", "32", "-n", "ESP", "-i", volume_id, "--invariant", output],
        quiet=True,
        env=env,
    )
    conf = output.parent / "loader.conf"
    conf.write_text(LOADER_CONF)
    img = ["-i", str(output)]
    dirs = ["::EFI", "::EFI/BOOT", "::EFI/systemd", "::EFI/Linux", "::loader"]
    copies = [
        (boot, "::EFI/BOOT/BOOTX64.EFI"),
        (boot, "::EFI/systemd/systemd-bootx64.efi"),
        (conf, "::loader/loader.conf"),
        (uki, f"::EFI/Linux/{uki_name(version)}"),
    ]
    if enrolment:
        dirs += ["::loader/keys", f"::{ENROLMENT_DIR}"]
        copies += [(path, f"::{ENROLMENT_DIR}/{path.name}") for path in sorted(enrolment)]
    run(["mmd", *img, *dirs], env=env)
    for source, dest in copies:
        run(["mcopy", *img, source, dest], env=env)
    conf.unlink()


def make_state(tree: Path, var: Path, size: int, output: Path, seed: str) -> None:
    """STATE's ext4 file system, seeded with the tree's /var, by the tree's own mke2fs."""
    output.unlink(missing_ok=True)
    with output.open("wb") as f:
        f.truncate(size)
    fs_uuid = stable_uuid(seed, "state-fs")
    run(
        [
            *tree_command(tree, "/usr/sbin/mke2fs"),
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            "STATE",
            "-U",
            str(fs_uuid),
            "-E",
            f"root_owner=0:0,hash_seed={stable_uuid(seed, 'state-hash')}",
            "-d",
            var,
            output,
        ],
        env={"MKE2FS_CONFIG": str(tree / "etc/mke2fs.conf"), "E2FSPROGS_FAKE_TIME": "1"},
    )


@dataclass(frozen=True)
class PartitionImage:
    spec: gpt.PartitionSpec
    content: Path | None  # None: left empty (zeros)
    attributes: int = 0


def _copy_sparse(source: Path, dest_fd: int, offset: int) -> None:
    """Copy `source` into the disk at `offset`, leaving all-zero blocks as holes."""
    chunk = MiB
    zero = bytes(chunk)
    with source.open("rb") as f:
        pos = 0
        while block := f.read(chunk):
            if block != zero[: len(block)]:
                os.pwrite(dest_fd, block, offset + pos)
            pos += len(block)


def make_disk(partitions: Sequence[PartitionImage], output: Path, seed: str) -> gpt.Table:
    """Lay out, fill and partition a sparse disk image; written to a temp name, then renamed."""
    total = MiB + sum(p.spec.size or 0 for p in partitions) + MiB
    table = gpt.plan_table(total, [p.spec for p in partitions], stable_uuid(seed, "disk"))
    if any(p.attributes for p in partitions):
        table = gpt.Table(
            disk_guid=table.disk_guid,
            partitions=tuple(
                gpt.Partition(
                    type_guid=t.type_guid,
                    part_guid=t.part_guid,
                    first_lba=t.first_lba,
                    last_lba=t.last_lba,
                    name=t.name,
                    attributes=p.attributes,
                )
                for t, p in zip(table.partitions, partitions, strict=True)
            ),
            first_usable_lba=table.first_usable_lba,
            last_usable_lba=table.last_usable_lba,
            sector_size=table.sector_size,
        )
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        with tmp.open("w+b") as f:
            f.truncate(total)
            for part, entry in zip(partitions, table.partitions, strict=True):
                if part.content is not None:
                    if part.content.stat().st_size > entry.size_bytes():
                        raise BuildError(
                            f"{part.content.name} ({part.content.stat().st_size} bytes) does not "
                            f"fit partition '{entry.name}' ({entry.size_bytes()} bytes)",
                            hint="raise the partition's size under [partitions] in the image "
                            "definition",
                        )
                    _copy_sparse(part.content, f.fileno(), entry.offset_bytes())
            gpt.write_table(f, total, table)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, output)
    return table


def berth_layout(
    config: ImageConfig,
    version: str,
    roothash: str,
    esp: Path,
    root: Path,
    verity: Path,
    state: Path,
    seed: str,
) -> list[PartitionImage]:
    """The Berth disk layout (design.md): ESP, root-A + verity, empty root-B + verity, STATE."""
    data_uuid, verity_uuid = gpt.uuid_pair_from_roothash(roothash)
    sizes = config.partitions
    ro = gpt.ATTR_READ_ONLY
    return [
        PartitionImage(gpt.PartitionSpec(gpt.ESP, "ESP", sizes.esp, stable_uuid(seed, "esp")), esp),
        PartitionImage(
            gpt.PartitionSpec(gpt.ROOT_X86_64, f"berth_{version}", sizes.root, data_uuid), root, ro
        ),
        PartitionImage(
            gpt.PartitionSpec(
                gpt.ROOT_X86_64_VERITY, f"berth_{version}_verity", sizes.verity, verity_uuid
            ),
            verity,
            ro,
        ),
        PartitionImage(
            gpt.PartitionSpec(gpt.ROOT_X86_64, "_empty", sizes.root, stable_uuid(seed, "root-b")),
            None,
            ro,
        ),
        PartitionImage(
            gpt.PartitionSpec(
                gpt.ROOT_X86_64_VERITY, "_empty", sizes.verity, stable_uuid(seed, "verity-b")
            ),
            None,
            ro,
        ),
        PartitionImage(
            gpt.PartitionSpec(gpt.LINUX_GENERIC, "STATE", sizes.state, stable_uuid(seed, "state")),
            state,
        ),
    ]
