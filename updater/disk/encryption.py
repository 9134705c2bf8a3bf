"""Whether STATE is encrypted, how it is bound to the TPM, and why a boot could not unlock it.

The initrd decides and opens STATE (overlays/base/usr/lib/berth/initrd/state-open) and leaves
what it found in `/run/berth/state.json`, which outlives switch-root; this module only reads
that, the TPM's presence from sysfs, and the EFI variable `BerthStateUnlock` that a boot which
could not unlock STATE wrote before it failed. That boot never reached STATE, so a variable is
the one place it can leave its reason for the release booted next (judge.after_boot reads it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

STATE_REPORT = Path("/run/berth/state.json")
TPM_CLASS = Path("/sys/class/tpm")
# Berth's vendor GUID for its own EFI variables; state-open writes the same name.
BERTH_GUID = "3f7d0f5c-4b1e-4b8a-9c57-2d8b1e6a90c4"
UNLOCK_VARIABLE = f"BerthStateUnlock-{BERTH_GUID}"
_MAX_VARIABLE = 4096
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_IMMUTABLE_FL = 0x10


@dataclass(frozen=True)
class StateEncryption:
    """What `status` says of STATE and the TPM."""

    encrypted: bool | None  # None: the initrd left no report (an older release's initrd)
    binding: str  # "tpm2-pcr11-signed", "tpm2-pcr11-signed+pcr7", "none"
    mode: str  # the image's `encrypt`: "auto", "tpm2", "off"
    note: str  # why it is not encrypted, when it is not
    tpm: str  # "TPM 2.0", "TPM 1.2", "none"

    def describe(self) -> str:
        if self.encrypted is None:
            return "unknown (this boot's initrd left no report)"
        if not self.encrypted:
            return f"not encrypted ({self.note or 'plain ext4'})"
        bound = "PCR 11 as signed by the build's PCR key"
        if self.binding.endswith("+pcr7"):
            bound += ", and PCR 7 (the Secure Boot state)"
        return f"LUKS2, unlocked by the TPM: {bound}"


def tpm_presence(tpm_class: Path = TPM_CLASS) -> str:
    try:
        major = (tpm_class / "tpm0" / "tpm_version_major").read_text().strip()
    except OSError:
        return "TPM 1.2" if (tpm_class / "tpm0").exists() else "none"
    return "TPM 2.0" if major == "2" else f"TPM {major}"


def state_encryption(report: Path = STATE_REPORT, tpm_class: Path = TPM_CLASS) -> StateEncryption:
    """What this boot's initrd found and did; a report that is missing or malformed reads as
    unknown rather than as "not encrypted"."""
    tpm = tpm_presence(tpm_class)
    try:
        doc = json.loads(report.read_bytes()[:_MAX_VARIABLE])
    except (OSError, ValueError):
        return StateEncryption(None, "none", "unknown", "", tpm)
    if not isinstance(doc, dict) or not isinstance(doc.get("encrypted"), bool):
        return StateEncryption(None, "none", "unknown", "", tpm)

    def text(key: str) -> str:
        value = doc.get(key)
        return value if isinstance(value, str) else ""

    return StateEncryption(
        doc["encrypted"], text("binding") or "none", text("mode"), text("note"), tpm
    )


@dataclass(frozen=True)
class UnlockFailure:
    version: str  # the release whose initrd could not unlock STATE
    reason: str  # as its console said it


def unlock_failure(efivars: Path) -> UnlockFailure | None:
    """The reason a boot left in `BerthStateUnlock` (4 bytes of attributes, then "VERSION\\n
    REASON\\n"); None when there is none or it is not one Berth wrote."""
    try:
        raw = (efivars / UNLOCK_VARIABLE).read_bytes()[: _MAX_VARIABLE + 4]
    except OSError:
        return None
    if len(raw) < 5:
        return None
    lines = raw[4:].decode("utf-8", "replace").splitlines()
    if len(lines) < 2 or not lines[0].strip():
        return None
    return UnlockFailure(lines[0].strip(), " ".join(line.strip() for line in lines[1:]).strip())


def clear_unlock_failure(efivars: Path) -> None:
    """Delete `BerthStateUnlock` once its reason is recorded. efivarfs makes variable files
    immutable (a stray `rm` must not brick firmware settings): that flag comes off first."""
    path = efivars / UNLOCK_VARIABLE
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(path, os.O_RDONLY)
        try:
            flags = struct.unpack("i", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, b"\0" * 4))[0]
            if flags & _FS_IMMUTABLE_FL:
                fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("i", flags & ~_FS_IMMUTABLE_FL))
        except OSError:
            pass  # not efivarfs (a test's directory): nothing to clear
        finally:
            os.close(fd)
        path.unlink()
