"""UEFI variable stores with Secure Boot keys enrolled, for machines that boot enforcing from
their first start (the way a cloud's custom signature database or a vendor's factory keys do).

virt-fw-vars (the `virt-firmware` package, the tool libvirt's and the clouds' firmware images
are prepared with) writes PK, KEK and db into a copy of OVMF's empty store and sets
SecureBootEnable. The certificates are the build's own, from `keys/secureboot/`: a machine
enrolled from them boots exactly what that keys directory signs.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

from builder.run import run
from qemu.vm import OVMF_VARS, VMError

NAMES = ("PK", "KEK", "db")


def enrolled_vars(
    secureboot_dir: Path, output: Path, template: Path = OVMF_VARS, *, enforce: bool = True
) -> Path:
    """`template` (OVMF's empty store) with `secureboot_dir`'s PK, KEK and db enrolled, owned by
    the GUID the keys were made with, and Secure Boot on (`enforce`) or switched off as a
    firmware setup screen does (keys kept, nothing checked): written to `output`."""
    certificates = {name: secureboot_dir / f"{name}.crt" for name in NAMES}
    for name, path in certificates.items():
        if not path.is_file():
            raise VMError(
                f"no {path}: enrolling Secure Boot keys needs {name}'s certificate",
                hint="make the keys with ./build.py keys init (a build makes development keys)",
            )
    guid_file = secureboot_dir / "GUID"
    try:
        owner = str(uuid.UUID(guid_file.read_text().strip()))
    except (OSError, ValueError) as e:
        raise VMError(f"{guid_file}: expected the keys' owner GUID ({e})") from None
    if not template.is_file():
        raise VMError(f"UEFI variable store {template} not found", hint="apt-get install ovmf")
    output.parent.mkdir(parents=True, exist_ok=True)
    run(
        [
            # The venv's interpreter: virt-firmware is a Python package (not in Debian 12).
            sys.executable,
            *("-m", "virt.firmware.vars"),
            *("--input", template, "--output", output),
            *("--set-pk", owner, certificates["PK"]),
            *("--add-kek", owner, certificates["KEK"]),
            *("--add-db", owner, certificates["db"]),
            *(("--sb",) if enforce else ("--set-false", "SecureBootEnable")),
        ],
        quiet=True,
    )
    return output
