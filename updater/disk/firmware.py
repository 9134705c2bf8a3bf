"""What the firmware and the kernel report about the boot's trust: Secure Boot and lockdown.

Secure Boot from efivarfs: UEFI's global variables SecureBoot (1: the firmware verifies what it
starts against db) and SetupMode (1: no platform key, so nothing is verified and keys may be
enrolled); each file is 4 bytes of attributes, then the one-byte value. Lockdown from securityfs:
`/sys/kernel/security/lockdown` lists the modes with the active one in brackets
("[none] integrity confidentiality"); the kernel turns lockdown on by itself when it was
booted with Secure Boot enforcing. Reads only; a machine without these files says so instead
of guessing.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path

GLOBAL_GUID = "8be4df61-93ca-11d2-aa0d-00e098032b8c"  # EFI_GLOBAL_VARIABLE
EFIVARS = Path("/sys/firmware/efi/efivars")
LOCKDOWN = Path("/sys/kernel/security/lockdown")


class SecureBoot(StrEnum):
    ENABLED = "enabled"  # the firmware starts only what db signed
    DISABLED = "disabled"  # keys enrolled (or none at all), not enforcing
    SETUP_MODE = "setup mode"  # no platform key: keys may be enrolled, nothing is checked
    NO_FIRMWARE_SUPPORT = "not supported by the firmware"  # UEFI without the variables
    NOT_UEFI = "unknown: no EFI variables"  # not booted through UEFI, or efivarfs not mounted


def _flag(efivars: Path, name: str) -> bool | None:
    """A one-byte global variable as a flag; None when it is missing or not one byte."""
    try:
        raw = (efivars / f"{name}-{GLOBAL_GUID}").read_bytes()
    except OSError:
        return None
    if len(raw) != 5:
        return None
    return raw[4] == 1


def secure_boot(efivars: Path = EFIVARS) -> SecureBoot:
    if not efivars.is_dir():
        return SecureBoot.NOT_UEFI
    enforcing = _flag(efivars, "SecureBoot")
    if enforcing is None:
        return SecureBoot.NO_FIRMWARE_SUPPORT
    if enforcing:
        return SecureBoot.ENABLED
    return SecureBoot.SETUP_MODE if _flag(efivars, "SetupMode") else SecureBoot.DISABLED


_ACTIVE = re.compile(r"\[([a-z]+)\]")


def lockdown(path: Path = LOCKDOWN) -> str:
    """The kernel's lockdown mode: "none", "integrity" or "confidentiality"; "unknown" when the
    kernel does not say (no securityfs, or a kernel without the lockdown module)."""
    try:
        text = path.read_text()
    except OSError:
        return "unknown"
    match = _ACTIVE.search(text)
    return match[1] if match else "unknown"
