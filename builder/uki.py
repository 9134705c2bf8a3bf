"""Stage 6: the Unified Kernel Image, built with the image's own systemd stub and ukify.

The command line carries `roothash=`, so a UKI boots exactly the root whose hash it names and the
boot path needs no A/B bookkeeping: systemd-veritysetup-generator finds the data and hash
partitions by the partition UUIDs derived from that hash.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path

from builder.run import run
from builder.treetool import tree_command

STUB = "usr/lib/systemd/boot/efi/linuxx64.efi.stub"
UKIFY = "usr/lib/systemd/ukify"
MEASURE = "/usr/lib/systemd/systemd-measure"
# The boot phases whose PCR 11 values are signed: only the initrd's. systemd-pcrphase extends
# PCR 11 with "leave-initrd" before switch-root, so once the initrd is done the TPM no longer
# unseals STATE's key: a compromised running system cannot read it out of the TPM again.
PCR_PHASES = "enter-initrd"


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
    pcr_key: tuple[Path, Path] | None = None,
) -> None:
    """Build the UKI; with `pcr_key` (private, public PEM) it also carries the signed PCR 11
    predictions (.pcrsig) and the public key (.pcrpkey), computed by the tree's systemd-measure."""
    output.unlink(missing_ok=True)
    args: list[str | Path] = [
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
    ]
    with tempfile.TemporaryDirectory(prefix="berth-ukify-") as tools:
        if pcr_key is not None:
            # ukify runs the systemd-measure it finds in --tools; this one is the tree's, run
            # against the tree's libraries (its PCR policy code needs the tree's tss2).
            wrapper = Path(tools) / "systemd-measure"
            command = shlex.join(tree_command(tree, MEASURE, argv0="systemd-measure"))
            wrapper.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
            wrapper.chmod(0o755)
            private, public = pcr_key
            args += [
                f"--tools={tools}",
                f"--pcr-private-key={private}",
                f"--pcr-public-key={public}",
                f"--phases={PCR_PHASES}",
                "--pcr-banks=sha256",
            ]
        run(
            args,
            # ukify's one dependency, pefile, comes from the tree as well.
            env={
                "PYTHONPATH": str(tree / "usr/lib/python3/dist-packages"),
                "SOURCE_DATE_EPOCH": "0",
            },
            quiet=True,
        )
