"""systemd-boot entries for Berth's UKIs on the ESP, with Automatic Boot Assessment counters.

Each installed version is one Unified Kernel Image in `EFI/Linux/`, named

    berth_<version>.efi                 blessed: booted fine, no counter
    berth_<version>+<left>[-<done>].efi on trial: systemd-boot decrements `left` at each boot,
                                        systemd-bless-boot drops the counter after a good one
    berth_<version>+0[-<done>].efi      bad: no tries left

systemd-boot sorts entries with no tries left to the end and the rest newest version first, then
boots the first one (loader.conf sets no `default`). So the newest version that is not bad boots,
and a version whose tries run out falls behind the previous one: rollback needs no bookkeeping
beyond file names. Each change is one rename in one directory, fsynced.

Runs on the device: standard library only.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from updater import run
from updater.errors import BootEntryError, CommandError
from updater.files import fsync_dir
from updater.release.version import Version

ENTRY_DIR = "EFI/Linux"
# systemd's vendor GUID for the boot loader interface variables (systemd's BOOT_LOADER_INTERFACE).
LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
ENTRY_SELECTED = Path(f"/sys/firmware/efi/efivars/LoaderEntrySelected-{LOADER_GUID}")
# Every entry systemd-boot found and could load at this boot (a UKI it cannot parse is left out).
LOADER_ENTRIES = Path(f"/sys/firmware/efi/efivars/LoaderEntries-{LOADER_GUID}")
# bootctl answers in well under a second; the margin is for an ESP automounted on first access.
BOOTCTL_TIMEOUT = 30.0
DEFAULT_TRIES = 3

# FAT keeps case but ignores it, and systemd-boot matches ".efi" without case: so do we.
_NAME = re.compile(
    r"berth_(?P<version>[0-9]+\.[0-9]+\.[0-9]+)(?:\+(?P<left>[0-9]+)(?:-(?P<done>[0-9]+))?)?\.efi",
    re.IGNORECASE,
)
_TEMP_PREFIX = ".berth_"
_TEMP_SUFFIX = ".efi.tmp"


class EntryState(StrEnum):
    GOOD = "good"  # blessed: no counter
    INDETERMINATE = "indeterminate"  # on trial: tries left
    BAD = "bad"  # no tries left


@dataclass(frozen=True)
class Entry:
    version: Version
    tries_left: int | None
    tries_done: int | None
    path: Path

    @property
    def state(self) -> EntryState:
        if self.tries_left is None:
            return EntryState.GOOD
        return EntryState.BAD if self.tries_left == 0 else EntryState.INDETERMINATE

    @property
    def name(self) -> str:
        return self.path.name


def entry_name(version: Version, tries_left: int | None = None, tries_done: int = 0) -> str:
    if tries_left is None:
        return f"berth_{version}.efi"
    if tries_done:
        return f"berth_{version}+{tries_left}-{tries_done}.efi"
    return f"berth_{version}+{tries_left}.efi"


def parse_entry_name(name: str) -> tuple[Version, int | None, int | None] | None:
    """(version, tries left, tries done) of a Berth entry's file name, None for anything else."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    try:
        version = Version.parse(match["version"])
    except ValueError:
        return None
    left = None if match["left"] is None else int(match["left"])
    done = None if match["done"] is None else int(match["done"])
    if left is not None and done is None:
        done = 0
    return version, left, done


def boot_order(entries: Collection[Entry]) -> list[Entry]:
    """systemd-boot's order (boot_entry_compare): no tries left last, then the newest version
    first, then the one with more tries left first. Python's sort is stable: sort by the least
    significant key first."""
    unlimited = 1 << 30
    ordered = sorted(
        entries, key=lambda e: unlimited if e.tries_left is None else e.tries_left, reverse=True
    )
    ordered.sort(key=lambda e: e.version, reverse=True)
    ordered.sort(key=lambda e: e.state is EntryState.BAD)
    return ordered


def entry_dir(esp: Path) -> Path:
    return esp / ENTRY_DIR


def entry_files(esp: Path) -> list[Path]:
    """Every file in the ESP's entry directory (none when there is no such directory)."""
    directory = entry_dir(esp)
    try:
        return [p for p in directory.iterdir() if p.is_file()]
    except FileNotFoundError:
        return []
    except OSError as e:
        raise BootEntryError(f"cannot list boot entries in {directory}: {e}") from e


def list_entries(esp: Path) -> list[Entry]:
    """Berth's entries on the ESP in systemd-boot's boot order: the first one boots next."""
    directory = entry_dir(esp)
    names = [p.name for p in entry_files(esp)]
    entries = []
    for name in names:
        parsed = parse_entry_name(name)
        if parsed is not None:
            entries.append(Entry(parsed[0], parsed[1], parsed[2], directory / name))
    return boot_order(entries)


def _rename(source: Path, target: Path) -> None:
    """Rename an entry and make its new directory entry complete on disk.

    FAT keeps a file's size and first cluster in its directory entry, and Linux's vfat creates
    the entry under the new name without them: they reach the disk only when the inode is
    written back. fsync of the directory alone leaves a zero-length `berth_<v>+3.efi` after a
    power cut, which systemd-boot cannot load. fsync of the file writes them; callers then
    fsync the directory for the removal of the old name.
    """
    try:
        os.rename(source, target)
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise BootEntryError(
            f"renaming boot entry {source.name} to {target.name} failed: {e}"
        ) from e


@contextlib.contextmanager
def staged_uki(esp: Path, version: Version, tries: int = DEFAULT_TRIES) -> Iterator[BinaryIO]:
    """A file to write a UKI into; on a clean exit it becomes the entry `berth_<v>+<tries>.efi`.

    The UKI is written under `.berth_<v>.efi.tmp`: systemd-boot loads only files ending in
    ".efi" and skips names starting with a dot, so until the final rename the boot loader sees
    nothing new. The file is fsynced before the rename and the directory after it; on an error
    the temporary file is removed and the ESP is as before.
    """
    if tries < 1:
        raise ValueError(f"a new entry needs at least one try, got {tries}")
    directory = entry_dir(esp)
    existing = [e.name for e in list_entries(esp) if e.version == version]
    if existing:
        raise BootEntryError(
            f"refused to install the UKI of {version}: {', '.join(existing)} is already on the "
            "ESP (remove it first)"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BootEntryError(f"cannot create {directory}: {e}") from e
    temp = directory / f"{_TEMP_PREFIX}{version}{_TEMP_SUFFIX}"
    final = directory / entry_name(version, tries)
    try:
        with temp.open("w+b") as f:  # readable: a seeded write checks what it wrote
            yield f
            f.flush()
            os.fsync(f.fileno())
        _rename(temp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    fsync_dir(directory)


def install_uki(
    esp: Path, version: Version, source: Path | BinaryIO, tries: int = DEFAULT_TRIES
) -> Path:
    """Copy a UKI onto the ESP as a new entry on trial (`tries` boots); return its path."""
    with staged_uki(esp, version, tries) as out:
        if isinstance(source, Path):
            with source.open("rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
        else:
            shutil.copyfileobj(source, out, 1 << 20)
    return entry_dir(esp) / entry_name(version, tries)


def _find(esp: Path, version: Version) -> list[Entry]:
    found = [e for e in list_entries(esp) if e.version == version]
    if not found:
        installed = ", ".join(e.name for e in list_entries(esp)) or "none"
        raise BootEntryError(f"no boot entry for {version} on the ESP (installed: {installed})")
    return found


def _bad_name(entry: Entry) -> str:
    return entry_name(entry.version, 0, entry.tries_done or 0)


def mark_bad(esp: Path, version: Version) -> list[Path]:
    """Give `version`'s entries zero tries left: systemd-boot sorts them last, never first."""
    renamed = []
    for entry in _find(esp, version):
        if entry.state is not EntryState.BAD:
            target = entry.path.with_name(_bad_name(entry))
            _rename(entry.path, target)
            renamed.append(target)
    if renamed:
        fsync_dir(entry_dir(esp))
    return renamed


def remove_entries(esp: Path, version: Version) -> list[Path]:
    """Delete `version`'s entries (before its slot is overwritten: its root is about to go)."""
    return remove(esp, [e for e in list_entries(esp) if e.version == version])


def set_aside(source: Path, target: Path) -> None:
    """Rename a file of the entry directory to a name systemd-boot ignores, durably."""
    _rename(source, target)
    fsync_dir(source.parent)


def remove(esp: Path, entries: Collection[Entry]) -> list[Path]:
    """Delete these entries, from a listing the caller already has; return the paths removed.

    An entry already gone is not an error: the listing may be older than the last rename.
    """
    removed = []
    for entry in entries:
        try:
            entry.path.unlink()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise BootEntryError(f"removing boot entry {entry.name} failed: {e}") from e
        removed.append(entry.path)
    if removed:
        fsync_dir(entry_dir(esp))
    return removed


def prune(esp: Path, keep: Collection[Version]) -> list[Path]:
    """Delete every Berth entry whose version is not in `keep`, and leftover temporary files."""
    directory = entry_dir(esp)
    removed = []
    for entry in list_entries(esp):
        if entry.version not in keep:
            removed.extend(remove_entries(esp, entry.version))
    with contextlib.suppress(FileNotFoundError):
        for path in directory.iterdir():
            if path.name.startswith(_TEMP_PREFIX) and path.name.endswith(_TEMP_SUFFIX):
                path.unlink()
                removed.append(path)
    if removed:
        fsync_dir(directory)
    return removed


def plan_next_boot(entries: list[Entry], version: Version) -> list[tuple[Path, Path]]:
    """The renames that make `version` the entry systemd-boot boots next.

    Rollback is done with file names, not with `bootctl set-default`/`set-oneshot`: an EFI
    variable lives in the firmware's NVRAM, outside the disk, some firmware loses or refuses
    writes to it, and a default pinned by it would also hide every later update. Marking the newer
    entries bad is one rename each on the ESP, survives any firmware, is what the agent does to a
    version that failed on its own, and means "the operator rejected it: do not retry it".
    A chosen version that is itself bad gets a fresh trial counter, so a failure still falls back.
    """
    target = [e for e in entries if e.version == version]
    if not target:
        installed = ", ".join(e.name for e in entries) or "none"
        raise BootEntryError(
            f"refused to boot {version} next: it has no boot entry (installed: {installed})"
        )
    renames = [
        (e.path, e.path.with_name(_bad_name(e)))
        for e in entries
        if e.version > version and e.state is not EntryState.BAD
    ]
    if all(e.state is EntryState.BAD for e in target):
        chosen = max(target, key=lambda e: e.tries_done or 0)
        renames.append((chosen.path, chosen.path.with_name(entry_name(version, DEFAULT_TRIES))))
    return renames


def set_next_boot(esp: Path, version: Version) -> list[tuple[Path, Path]]:
    """Make `version` boot next (manual rollback); return the renames done."""
    renames = plan_next_boot(list_entries(esp), version)
    for source, target in renames:
        _rename(source, target)
    if renames:
        fsync_dir(entry_dir(esp))
    return renames


def _efi_strings(path: Path) -> list[str] | None:
    """The strings of a systemd-boot EFI variable, or None without that variable."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise BootEntryError(f"cannot read {path}: {e}") from e
    # efivarfs: 4 bytes of attributes, then the value: NUL-terminated UTF-16LE strings.
    text = raw[4:].decode("utf-16-le", errors="replace")
    return [s for s in text.split("\0") if s]


def booted_entry(path: Path = ENTRY_SELECTED) -> str | None:
    """The entry id systemd-boot booted (LoaderEntrySelected), or None without that variable."""
    strings = _efi_strings(path)
    return strings[0] if strings else None


def loaded_versions(path: Path = LOADER_ENTRIES) -> set[Version] | None:
    """The versions of the Berth entries systemd-boot could load at this boot (LoaderEntries),
    or None without that variable (another boot loader, or no EFI)."""
    strings = _efi_strings(path)
    if strings is None:
        return None
    parsed = (parse_entry_name(s) for s in strings)
    return {p[0] for p in parsed if p is not None}


def booted_version(path: Path = ENTRY_SELECTED) -> Version | None:
    """The version of the booted Berth entry, or None (no variable, or not a Berth entry)."""
    entry = booted_entry(path)
    parsed = None if entry is None else parse_entry_name(entry)
    return None if parsed is None else parsed[0]


def find_esp() -> Path:
    """Where the ESP is mounted on this machine, as systemd knows it."""
    try:
        result = run.run(["bootctl", "--print-esp-path"], timeout=BOOTCTL_TIMEOUT)
    except CommandError as e:
        raise BootEntryError(f"cannot find the ESP: {e}") from e
    return Path(result.stdout.decode().strip())
