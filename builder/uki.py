"""Stage 6: the Unified Kernel Image, built with the image's own systemd stub and ukify.

The command line carries `roothash=`, so a UKI boots exactly the root whose hash it names and the
boot path needs no A/B bookkeeping: systemd-veritysetup-generator finds the data and hash
partitions by the partition UUIDs derived from that hash.
"""

from __future__ import annotations

import sys
from pathlib import Path

from builder.run import run

STUB = "usr/lib/systemd/boot/efi/linuxx64.efi.stub"
UKIFY = "usr/lib/systemd/ukify"


def kernel_cmdline(roothash: str, extra: tuple[str, ...]) -> str:
    words = [
        "root=/dev/mapper/root",
        "rootfstype=erofs",
        "ro",
        f"roothash={roothash}",
        # A block whose hash does not match reboots the machine instead of returning EIO to
        # whoever read it: changed data never runs, and boot counting falls back to the
        # previous version.
        "systemd.verity_root_options=restart-on-corruption",
        *extra,
    ]
    return " ".join(words)


def build_uki(
    tree: Path,
    kernel: Path,
    kernel_version: str,
    initrd: Path,
    os_release: Path,
    cmdline: str,
    output: Path,
) -> None:
    output.unlink(missing_ok=True)
    run(
        [
            sys.executable,
            tree / UKIFY,
            "build",
            f"--linux={kernel}",
            f"--initrd={initrd}",
            f"--cmdline={cmdline}",
            f"--os-release=@{os_release}",
            f"--uname={kernel_version}",
            f"--stub={tree / STUB}",
            "--efi-arch=x64",
            f"--output={output}",
        ],
        # ukify's one dependency, pefile, comes from the tree as well.
        env={"PYTHONPATH": str(tree / "usr/lib/python3/dist-packages"), "SOURCE_DATE_EPOCH": "0"},
        quiet=True,
    )
