"""Boot entries the firmware would refuse, set aside before the machine boots into them.

The agent checks every UKI it installs (install.py, step 4b). A file put on the ESP by hand, or
by anything else that can write it, is not: with Secure Boot enforced the firmware refuses to
load it, systemd-boot 257 (Debian 13's) then returns to the firmware, and after trying its
other boot options the firmware stops at its menu, waiting for a key, with the good entries
unused. So, with Secure Boot enforced, every PE image systemd-boot would pick (`EFI/Linux/*.efi`,
and the images `loader/entries/*.conf` name) is checked against db and dbx as the firmware will
check it (authenticode.py), and each entry that would be refused is renamed `<name>.refused`:
systemd-boot only reads `*.efi` and `*.conf` there, so the machine boots the newest entry the
firmware accepts, and the file stays there for the operator to look at. It runs when the
machine stops (berth-boot-check.service, before every reboot and power-off) and after each boot
(the judge).
"""

from __future__ import annotations

import logging
import mmap
from dataclasses import dataclass
from pathlib import Path

from updater.disk import authenticode, bootentries, firmware
from updater.errors import VerificationError
from updater.release.version import Version
from updater.update.context import Context

log = logging.getLogger(__name__)

REFUSED_SUFFIX = ".refused"


@dataclass(frozen=True)
class Refused:
    name: str  # the entry's file name before it was set aside
    reason: str  # what the firmware would object to, naming the signer


def check_image_file(path: Path, db: authenticode.Database, dbx: authenticode.Database) -> None:
    """VerificationError when the firmware would not start the PE image at `path`."""
    with path.open("rb") as f:
        if path.stat().st_size == 0:
            raise VerificationError(f"refused image {path.name}: the file is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as image:
            authenticode.check_image(image, db, dbx, f"image {path.name}")


TYPE1_DIR = "loader/entries"
# The keys of a type #1 entry (Boot Loader Specification) that name a PE image to load.
_IMAGE_KEYS = ("linux", "efi", "uki")


def _type1_images(esp: Path, conf: Path) -> list[Path]:
    """The PE images a type #1 entry makes systemd-boot load (paths from the ESP's root)."""
    images = []
    for line in conf.read_text(errors="replace").splitlines():
        fields = line.split(None, 1)  # "key value", separated by spaces or tabs
        if len(fields) == 2 and fields[0] in _IMAGE_KEYS:
            images.append(esp / fields[1].strip().replace("\\", "/").lstrip("/"))
    return images


def _candidates(esp: Path) -> list[tuple[Path, list[Path]]]:
    """Every entry systemd-boot would offer: (the entry's file, the images it loads)."""
    # FAT names are case-insensitive, and so is systemd-boot's match of ".efi" and ".conf".
    found = [(p, [p]) for p in bootentries.entry_files(esp) if p.suffix.lower() == ".efi"]
    try:
        confs = [p for p in (esp / TYPE1_DIR).iterdir() if p.suffix.lower() == ".conf"]
    except OSError:
        confs = []  # none (Berth writes none), or unreadable as for systemd-boot
    for conf in confs:
        try:
            found.append((conf, _type1_images(esp, conf)))
        except OSError as e:
            log.warning("cannot read boot entry %s: %s", conf.name, e)
    return sorted(found)


def set_aside_refused(esp: Path, efivars: Path, booted: Version | None) -> list[Refused]:
    """Rename each entry (`EFI/Linux/*.efi`, `loader/entries/*.conf`) that makes the firmware
    load an image it would refuse to `<name>.refused`; the ones renamed. Nothing is checked,
    and nothing renamed, unless Secure Boot is enforced; the entries of the `booted` version
    are kept whatever the check says (the firmware started one of them: a db changed since is
    the operator's to sort out, not a reason to leave the machine without its running
    version)."""
    if firmware.secure_boot(efivars) is not firmware.SecureBoot.ENABLED:
        return []
    db = authenticode.read_database(efivars, "db")
    dbx = authenticode.read_database(efivars, "dbx")
    refused = []
    for path, images in _candidates(esp):
        parsed = bootentries.parse_entry_name(path.name)
        if booted is not None and parsed is not None and parsed[0] == booted:
            continue
        try:
            for image in images:
                if image.exists():  # a missing file is skipped by systemd-boot itself
                    check_image_file(image, db, dbx)
        except VerificationError as e:
            bootentries.set_aside(path, path.with_name(path.name + REFUSED_SUFFIX))
            text, own = str(e), f"refused image {path.name}: "
            # "signed by ..." for an entry that is the image; "image X: ..." for one naming it.
            reason = (
                text.removeprefix(own) if text.startswith(own) else text.removeprefix("refused ")
            )
            log.warning(
                "set aside boot entry %s as %s%s: the firmware would not start it (%s)",
                path.name,
                path.name,
                REFUSED_SUFFIX,
                reason,
            )
            refused.append(Refused(path.name, reason))
        except (OSError, ValueError) as e:
            # Unreadable here is unreadable for the firmware too; leave it to boot counting.
            log.warning("cannot check boot entry %s: %s", path.name, e)
    return refused


def check_entries(ctx: Context) -> list[Refused]:
    """set_aside_refused for this machine, keeping the entries of the version it booted."""
    machine = ctx.machine
    booted = bootentries.booted_version(machine.loader_entry)
    return set_aside_refused(machine.esp, machine.efivars, booted)
