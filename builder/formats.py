"""Disk image formats for every platform, each converted from the sparse GPT disk.raw.

disk.raw is 6 GiB apparent but about 200 MB allocated, so every converter must skip holes rather
than read and write zeros: qemu-img detects zero clusters, GNU tar's --sparse and zstd store holes
compactly, and the fixed VHD is written into a sparse file. Each output is written to a temporary
name, flushed and renamed, so a failed conversion never leaves a file that looks finished.

Platforms, file names and how to import each: docs/platforms.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from builder.config import OutputFormat
from builder.log import complete_step
from builder.overlay import render_template
from builder.run import find_tool, run

MiB = 1 << 20

FILE_NAMES: Mapping[OutputFormat, str] = {
    OutputFormat.RAW: "disk.raw",
    OutputFormat.QCOW2: "disk.qcow2",
    OutputFormat.VMDK: "disk.vmdk",
    OutputFormat.OVA: "disk.ova",
    OutputFormat.VHD: "disk.vhd",
    OutputFormat.GCE: "disk.gce.tar.gz",
    OutputFormat.RAW_ZST: "disk.raw.zst",
}

# Host tools per format (their Debian packages are in builder.run.HOST_TOOLS).
TOOLS: Mapping[OutputFormat, tuple[str, ...]] = {
    OutputFormat.RAW: (),
    OutputFormat.QCOW2: ("qemu-img",),
    OutputFormat.VMDK: ("qemu-img",),
    OutputFormat.OVA: ("qemu-img",),
    OutputFormat.VHD: ("qemu-img",),
    OutputFormat.GCE: ("tar", "gzip"),
    OutputFormat.RAW_ZST: ("zstd",),
}

# The conversion order: an OVA packs the VMDK, so the VMDK comes first.
ORDER = (
    OutputFormat.QCOW2,
    OutputFormat.VMDK,
    OutputFormat.OVA,
    OutputFormat.VHD,
    OutputFormat.GCE,
    OutputFormat.RAW_ZST,
)

OVF_TEMPLATE = Path(__file__).resolve().parent / "templates" / "vmware.ovf.j2"
VMDK_FORMAT_URL = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
# GCE imports a gzip'd tar whose only member is named exactly disk.raw; Google's import guide
# writes it with `tar --format=oldgnu -S`, whose sparse members its importer reads.
GCE_MEMBER = "disk.raw"
# gzip -1 against -6 on containerhost (the data is mostly the already compressed erofs):
# 194.06 MB in 8.4 s against 193.92 MB in 9.8 s; the 0.07% are not worth the time.
GCE_GZIP_LEVEL = 1
# zstd -T0 on containerhost's disk.raw (2 cores): level 1 194.6 MB, level 3 194.3 MB in 5-9 s,
# level 9 193.9 MB in 13 s, level 19 193.4 MB in 125 s. The root is already compressed erofs,
# so higher levels buy under 0.5%; 3 (zstd's default) is the fast end without giving anything up.
ZSTD_LEVEL = 3


@dataclass(frozen=True)
class Appliance:
    """What the OVF descriptor says about the virtual machine an OVA creates."""

    name: str  # image name, e.g. "containerhost"
    version: str
    description: str = ""
    cpus: int = 2
    memory_mib: int = 4096


def file_name(fmt: OutputFormat) -> str:
    return FILE_NAMES[fmt]


def host_tools(formats: Sequence[OutputFormat]) -> tuple[str, ...]:
    """The host tools that converting to `formats` needs."""
    return tuple(dict.fromkeys(tool for fmt in formats for tool in TOOLS[fmt]))


def image_info(path: Path, fmt: str | None = None) -> dict[str, Any]:
    """`qemu-img info` as JSON; `fmt` for what qemu-img cannot probe (a fixed VHD reads as raw)."""
    # -U: the image may be open in a running QEMU, which holds a write lock on it.
    forced = ["-f", fmt] if fmt else []
    result = run(["qemu-img", "info", "-U", *forced, "--output=json", path], capture=True)
    info: dict[str, Any] = json.loads(result.stdout)
    return info


@contextlib.contextmanager
def _atomic(output: Path) -> Iterator[Path]:
    """A temporary path beside `output`; flushed and renamed to `output` when the block succeeds."""
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def make_qcow2(raw: Path, output: Path) -> None:
    with _atomic(output) as tmp:
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, tmp], quiet=True)


def make_vmdk(raw: Path, output: Path) -> None:
    """A stream-optimized VMDK: compressed grains, the form an OVA carries and vSphere imports."""
    options = "subformat=streamOptimized,adapter_type=lsilogic"
    with _atomic(output) as tmp:
        run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", options, raw, tmp], quiet=True)


def render_ovf(
    appliance: Appliance,
    vmdk_name: str,
    vmdk_size: int,
    capacity: int,
    template: Path = OVF_TEMPLATE,
) -> str:
    """The OVF descriptor for one disk: builder/templates/vmware.ovf.j2, rendered strictly."""
    variables = {
        "appliance": appliance,
        # Attribute values arrive quoted and escaped; the template does not add quotes.
        "name_attr": quoteattr(f"berth-{appliance.name}"),
        "vmdk_href": quoteattr(vmdk_name),
        "vmdk_size": vmdk_size,
        "capacity": capacity,
        "vmdk_format": quoteattr(VMDK_FORMAT_URL),
    }
    return render_template(template, variables)


def make_ova(vmdk: Path, output: Path, appliance: Appliance) -> None:
    """An OVA: a ustar archive of the OVF descriptor, then the disk, then a SHA256 manifest.

    The order is the OVF specification's: a reader streaming the archive meets the descriptor first.
    """
    stem = output.name.removesuffix(".ova")
    ovf_name, vmdk_name, mf_name = f"{stem}.ovf", f"{stem}.vmdk", f"{stem}.mf"
    capacity = int(image_info(vmdk, "vmdk")["virtual-size"])
    ovf = render_ovf(appliance, vmdk_name, vmdk.stat().st_size, capacity).encode()
    with vmdk.open("rb") as f:
        vmdk_digest = hashlib.file_digest(f, "sha256").hexdigest()
    manifest = (
        f"SHA256({ovf_name})= {hashlib.sha256(ovf).hexdigest()}\n"
        f"SHA256({vmdk_name})= {vmdk_digest}\n"
    ).encode()
    with _atomic(output) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as ova:
        _add_bytes(ova, ovf_name, ovf)
        info = _member(vmdk_name, vmdk.stat().st_size)
        with vmdk.open("rb") as f:
            ova.addfile(info, f)
        _add_bytes(ova, mf_name, manifest)


def _member(name: str, size: int) -> tarfile.TarInfo:
    # Fixed owner, mode and time: the archive's headers do not depend on who built it when.
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uname = info.gname = "root"
    return info


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    archive.addfile(_member(name, len(data)), io.BytesIO(data))


def make_vhd(raw: Path, output: Path) -> None:
    """A fixed VHD for Azure: the disk, rounded up to a whole MiB, then the 512-byte footer.

    Azure rejects a VHD whose virtual size is not a whole number of MiB. force_size keeps that size
    exact (otherwise qemu-img rounds it to a CHS geometry). The file is created sparse first and
    filled with --target-is-zero, so the disk's holes stay holes in the VHD too.
    """
    size = -(-raw.stat().st_size // MiB) * MiB
    with _atomic(output) as tmp:
        options = "subformat=fixed,force_size=on"
        run(["qemu-img", "create", "-q", "-f", "vpc", "-o", options, tmp, str(size)], quiet=True)
        run(
            ["qemu-img", "convert", "-n", "--target-is-zero", "-f", "raw", "-O", "vpc", raw, tmp],
            quiet=True,
        )


def make_gce(raw: Path, output: Path) -> None:
    """disk.raw in a gzip'd oldgnu tar, its holes kept as sparse regions: GCE's import format."""
    gzip = f"{find_tool('gzip')} -n -{GCE_GZIP_LEVEL}"
    with _atomic(output) as tmp:
        run(
            [
                "tar",
                "--create",
                "--format=oldgnu",
                "--sparse",
                # Fixed metadata: the same disk gives the same archive.
                "--mtime=@0",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "--mode=0644",
                f"--transform=s|.*|{GCE_MEMBER}|",
                f"--use-compress-program={gzip}",
                f"--file={tmp.absolute()}",
                f"--directory={raw.parent.absolute()}",
                raw.name,
            ],
            quiet=True,
        )


def make_raw_zst(raw: Path, output: Path) -> None:
    """The disk, zstd-compressed, to write to a drive (`zstd -dc ... | dd`; docs/platforms.md)."""
    with _atomic(output) as tmp:
        run(["zstd", "-q", "-f", "-T0", f"-{ZSTD_LEVEL}", raw, "-o", tmp], quiet=True)


def write_formats(
    raw: Path, formats: Sequence[OutputFormat], appliance: Appliance
) -> dict[OutputFormat, Path]:
    """Convert `raw` into each of `formats`, named by FILE_NAMES, beside it.

    `raw` itself stays only when `formats` holds RAW. Returns the outputs in conversion order.
    """
    wanted = set(formats)
    # An OVA carries a VMDK; without "vmdk" in the formats that VMDK is only an intermediate.
    needed = wanted | ({OutputFormat.VMDK} if OutputFormat.OVA in wanted else set())
    keep_vmdk = OutputFormat.VMDK in wanted
    vmdk = raw.parent / (file_name(OutputFormat.VMDK) if keep_vmdk else ".ova-disk.vmdk")
    outputs: dict[OutputFormat, Path] = {}
    if OutputFormat.RAW in wanted:
        outputs[OutputFormat.RAW] = raw
    try:
        for fmt in (f for f in ORDER if f in needed):
            output = vmdk if fmt is OutputFormat.VMDK else raw.parent / file_name(fmt)
            with complete_step(f"Writing {output.name} ({fmt})"):
                match fmt:
                    case OutputFormat.QCOW2:
                        make_qcow2(raw, output)
                    case OutputFormat.VMDK:
                        make_vmdk(raw, output)
                    case OutputFormat.OVA:
                        make_ova(vmdk, output, appliance)
                    case OutputFormat.VHD:
                        make_vhd(raw, output)
                    case OutputFormat.GCE:
                        make_gce(raw, output)
                    case OutputFormat.RAW_ZST:
                        make_raw_zst(raw, output)
            if fmt in wanted:
                outputs[fmt] = output
    finally:
        if not keep_vmdk:
            vmdk.unlink(missing_ok=True)
    if OutputFormat.RAW not in wanted:
        raw.unlink()
    return outputs


def describe_outputs(outputs: Mapping[OutputFormat, Path], disk_size: int) -> str:
    """disks.json: each format's file with its length and allocated bytes (sparse files differ)."""
    doc = {
        "disk_size": disk_size,
        "formats": {
            str(fmt): {
                "file": path.name,
                "size": path.stat().st_size,
                "allocated": path.stat().st_blocks * 512,
            }
            for fmt, path in outputs.items()
        },
    }
    return json.dumps(doc, indent=2) + "\n"
