"""What the Secure Boot tests share: a real PE image, signing it with sbsign, and EFI variables
as efivarfs shows them (db written by efitools)."""

from __future__ import annotations

import uuid
from pathlib import Path

from builder.run import find_tool, run
from updater.disk import firmware

SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")  # systemd-boot-efi
# efivarfs's first 4 bytes: non-volatile, boot and runtime access, time-based authenticated
ATTRIBUTES = b"\x27\x00\x00\x00"


def sbsign(image: Path, key: Path, cert: Path, out: Path) -> bytes:
    run([find_tool("sbsign"), "--key", key, "--cert", cert, "--output", out, image])
    return out.read_bytes()


def signature_lists(work: Path, *certs: Path) -> bytes:
    """A db (or dbx) variable holding `certs`, as efivarfs shows it: attributes, then one
    EFI_SIGNATURE_LIST per certificate, each made by efitools' cert-to-efi-sig-list."""
    out = ATTRIBUTES
    for n, cert in enumerate(certs):
        esl = work / f"cert-{n}.esl"
        run([find_tool("cert-to-efi-sig-list"), "-g", str(uuid.uuid4()), cert, esl])
        out += esl.read_bytes()
    return out


def set_flags(efivars: Path, **values: int) -> None:
    """One-byte global variables (SecureBoot, SetupMode) in an efivarfs directory."""
    efivars.mkdir(parents=True, exist_ok=True)
    for name, value in values.items():
        (efivars / f"{name}-{firmware.GLOBAL_GUID}").write_bytes(ATTRIBUTES + bytes([value]))
