"""Every platform format from a small sparse GPT disk, each checked by its own reader.

qemu-img reads back what it can (info, check, compare against the raw disk); the VHD footer, the
OVA's tar headers, OVF and manifest, and the GCE tar are parsed here, independently of the code
that wrote them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from builder import formats
from builder.config import OutputFormat
from builder.disk import PartitionImage, make_disk
from builder.errors import ConfigError
from builder.run import run
from updater.disk import gpt

MiB = 1 << 20
DISK_SIZE = (1 + 2 + 24 + 4 + 1) * MiB
APPLIANCE = formats.Appliance("testhost", "1.2.3", "A test & <appliance>")

OVF = "http://schemas.dmtf.org/ovf/envelope/1"
RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VMW = "http://www.vmware.com/schema/ovf"


def _data(path: Path, size: int, seed: bytes, hole: int = 0) -> Path:
    """`size` bytes that do not compress to nothing, then `hole` bytes of zeros left unallocated."""
    block = b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(2048))
    with path.open("wb") as f:
        f.write((block * (size // len(block) + 1))[:size])
        f.truncate(size + hole)
    return path


@pytest.fixture(scope="module")
def raw_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32 MiB GPT disk with about 3 MiB of data; each test converts a copy of it."""
    base = tmp_path_factory.mktemp("disk")
    spec = gpt.PartitionSpec
    make_disk(
        [
            PartitionImage(
                spec(gpt.ESP, "ESP", 2 * MiB, uuid.UUID(int=1)), _data(base / "esp", 300_000, b"e")
            ),
            # Data, then 20 MiB that must stay a hole in every format that can keep holes.
            PartitionImage(
                spec(gpt.ROOT_X86_64, "root", 24 * MiB, uuid.UUID(int=2)),
                _data(base / "root", 2 * MiB, b"r", hole=20 * MiB),
            ),
            PartitionImage(
                spec(gpt.LINUX_GENERIC, "STATE", 4 * MiB, uuid.UUID(int=3)),
                _data(base / "state", 100_000, b"s"),
            ),
        ],
        base / "disk.raw",
        "formats-test",
    )
    return base / "disk.raw"


@pytest.fixture
def raw(raw_disk: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "out" / "disk.raw"
    copy.parent.mkdir()
    run(["cp", "--sparse=always", raw_disk, copy])
    return copy


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def assert_same_disk(raw: Path, image: Path, fmt: str) -> None:
    """qemu-img compare: the guest sees exactly the raw disk's bytes (exit status 0)."""
    result = run(["qemu-img", "compare", "-f", "raw", "-F", fmt, raw, image], capture=True)
    assert b"Images are identical" in result.stdout


def qemu_check(image: Path, fmt: str) -> None:
    result = run(["qemu-img", "check", "-f", fmt, image], capture=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"No errors were found" in result.stdout


def test_raw_disk_is_sparse(raw_disk: Path) -> None:
    assert raw_disk.stat().st_size == DISK_SIZE
    assert allocated(raw_disk) < 4 * MiB


def test_qcow2(raw: Path) -> None:
    out = raw.parent / "disk.qcow2"
    formats.make_qcow2(raw, out)
    info = formats.image_info(out)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == DISK_SIZE
    qemu_check(out, "qcow2")
    assert_same_disk(raw, out, "qcow2")
    assert out.stat().st_size < 5 * MiB


def test_vmdk_is_stream_optimized(raw: Path) -> None:
    out = raw.parent / "disk.vmdk"
    formats.make_vmdk(raw, out)
    info = formats.image_info(out)
    assert info["format"] == "vmdk"
    assert info["virtual-size"] == DISK_SIZE
    specific = info["format-specific"]["data"]
    assert specific["create-type"] == "streamOptimized"
    assert all(extent["compressed"] for extent in specific["extents"])
    qemu_check(out, "vmdk")
    assert_same_disk(raw, out, "vmdk")
    assert out.stat().st_size < 5 * MiB


def _tar_headers(path: Path) -> list[tuple[str, bytes, int]]:
    """(name, magic+version, size) of each member, read from the 512-byte headers themselves."""
    headers = []
    with path.open("rb") as f:
        while (block := f.read(512)) and block != bytes(512):
            name = block[:100].rstrip(b"\0").decode()
            size = int(block[124:136].rstrip(b"\0 ") or b"0", 8)
            headers.append((name, block[257:265], size))
            f.seek(-(-size // 512) * 512, 1)
    return headers


def _ovf_attr(element: ET.Element, name: str) -> str:
    value = element.get(f"{{{OVF}}}{name}")
    assert value is not None, f"{element.tag} has no ovf:{name}"
    return value


def test_ova_descriptor_disk_and_manifest(raw: Path, tmp_path: Path) -> None:
    vmdk = raw.parent / "disk.vmdk"
    formats.make_vmdk(raw, vmdk)
    ova = raw.parent / "disk.ova"
    formats.make_ova(vmdk, ova, APPLIANCE)

    # ustar members in the order OVF requires: descriptor first, then the disk, then the manifest.
    headers = _tar_headers(ova)
    assert [name for name, _, _ in headers] == ["disk.ovf", "disk.vmdk", "disk.mf"]
    assert all(magic == b"ustar\x0000" for _, magic, _ in headers)
    with tarfile.open(ova) as archive:
        archive.extractall(tmp_path / "ova", filter="data")
    ovf_file, disk, mf = (tmp_path / "ova" / name for name, _, _ in headers)
    assert sha256(disk) == sha256(vmdk)

    # Well-formed XML whose file reference, size, capacity and disk reference match the disk.
    root = ET.fromstring(ovf_file.read_bytes())
    assert root.tag == f"{{{OVF}}}Envelope"
    files = root.findall(f"{{{OVF}}}References/{{{OVF}}}File")
    assert len(files) == 1
    assert _ovf_attr(files[0], "href") == "disk.vmdk"
    assert int(_ovf_attr(files[0], "size")) == disk.stat().st_size
    disks = root.findall(f"{{{OVF}}}DiskSection/{{{OVF}}}Disk")
    assert len(disks) == 1
    assert _ovf_attr(disks[0], "fileRef") == _ovf_attr(files[0], "id")
    assert int(_ovf_attr(disks[0], "capacity")) == DISK_SIZE
    assert _ovf_attr(disks[0], "capacityAllocationUnits") == "byte"
    assert _ovf_attr(disks[0], "format").endswith("#streamOptimized")
    hardware = root.find(f"{{{OVF}}}VirtualSystem/{{{OVF}}}VirtualHardwareSection")
    assert hardware is not None
    items = hardware.findall(f"{{{OVF}}}Item")
    resources = [item.findtext(f"{{{RASD}}}HostResource") for item in items]
    assert f"ovf:/disk/{_ovf_attr(disks[0], 'diskId')}" in resources
    # Berth boots only through UEFI.
    config = {c.get(f"{{{VMW}}}key"): c.get(f"{{{VMW}}}value") for c in hardware}
    assert config["firmware"] == "efi"
    # Text from the image definition is escaped, not markup.
    system = root.find(f"{{{OVF}}}VirtualSystem")
    assert system is not None
    annotation = system.findtext(f"{{{OVF}}}AnnotationSection/{{{OVF}}}Annotation")
    assert annotation == "A test & <appliance>"
    assert system.findtext(f"{{{OVF}}}Name") == "Berth testhost 1.2.3"

    # The manifest's SHA256 lines match both files.
    assert mf.read_text().splitlines() == [
        f"SHA256(disk.ovf)= {sha256(ovf_file)}",
        f"SHA256(disk.vmdk)= {sha256(disk)}",
    ]
    info = formats.image_info(disk)
    assert info["virtual-size"] == DISK_SIZE
    assert_same_disk(raw, disk, "vmdk")


def _vhd_footer(path: Path) -> dict[str, Any]:
    """The VHD footer (the file's last 512 bytes), field by field, big-endian."""
    with path.open("rb") as f:
        f.seek(-512, 2)
        footer = f.read(512)
    checksum = int.from_bytes(footer[64:68], "big")
    summed = footer[:64] + bytes(4) + footer[68:]
    return {
        "cookie": footer[0:8],
        "features": int.from_bytes(footer[8:12], "big"),
        "version": int.from_bytes(footer[12:16], "big"),
        "data_offset": int.from_bytes(footer[16:24], "big"),
        "original_size": int.from_bytes(footer[40:48], "big"),
        "current_size": int.from_bytes(footer[48:56], "big"),
        "disk_type": int.from_bytes(footer[60:64], "big"),
        "checksum": checksum,
        # Ones' complement of the byte sum with the checksum field taken as zero.
        "expected_checksum": ~sum(summed) & 0xFFFFFFFF,
    }


def test_vhd_is_fixed_with_a_valid_footer(raw: Path) -> None:
    out = raw.parent / "disk.vhd"
    formats.make_vhd(raw, out)
    footer = _vhd_footer(out)
    assert footer["cookie"] == b"conectix"
    assert footer["features"] == 2  # the reserved bit, always set
    assert footer["version"] == 0x00010000
    assert footer["data_offset"] == 0xFFFFFFFFFFFFFFFF  # fixed disks have no dynamic header
    assert footer["disk_type"] == 2  # fixed
    assert footer["checksum"] == footer["expected_checksum"]
    assert footer["current_size"] == footer["original_size"] == DISK_SIZE
    assert out.stat().st_size == DISK_SIZE + 512
    info = formats.image_info(out, "vpc")
    assert info["virtual-size"] == DISK_SIZE
    assert_same_disk(raw, out, "vpc")
    # The holes stay holes: the 32 MiB VHD allocates about what the raw disk does.
    assert allocated(out) < allocated(raw) + MiB


def test_vhd_footer_checksum_catches_a_changed_byte(raw: Path) -> None:
    out = raw.parent / "disk.vhd"
    formats.make_vhd(raw, out)
    with out.open("r+b") as f:
        f.seek(-512 + 48 + 7, 2)  # the lowest byte of the current size
        f.write(b"\x01")
    footer = _vhd_footer(out)
    assert footer["checksum"] != footer["expected_checksum"]


def test_vhd_rounds_the_size_up_to_a_whole_mib(tmp_path: Path) -> None:
    odd = _data(tmp_path / "odd.raw", 3_000_000, b"o")
    out = tmp_path / "odd.vhd"
    formats.make_vhd(odd, out)
    footer = _vhd_footer(out)
    assert footer["current_size"] == 3 * MiB
    assert footer["checksum"] == footer["expected_checksum"]
    assert out.stat().st_size == 3 * MiB + 512
    assert_same_disk(odd, out, "vpc")  # the added tail reads as zeros


def test_gce_tar_holds_exactly_disk_raw(raw: Path, tmp_path: Path) -> None:
    out = raw.parent / "disk.gce.tar.gz"
    formats.make_gce(raw, out)
    data = out.read_bytes()
    assert data[:2] == b"\x1f\x8b"
    assert data[3] & 0x08 == 0, "gzip header carries a file name"
    header = gzip.decompress(data)[:512]
    assert header[:100].rstrip(b"\0") == b"disk.raw"
    assert header[257:265] == b"ustar  \0"  # GNU's old format, as in Google's import guide
    assert header[156:157] == b"S"  # a sparse member: the holes are not stored
    with tarfile.open(out) as archive:
        members = archive.getmembers()
        assert [m.name for m in members] == ["disk.raw"]
        assert members[0].issparse()
        assert members[0].size == DISK_SIZE
        archive.extractall(tmp_path / "gce", filter="data")
    assert sha256(tmp_path / "gce" / "disk.raw") == sha256(raw)
    assert out.stat().st_size < 5 * MiB
    # Fixed metadata: converting the same disk again gives the same bytes.
    again = tmp_path / "again.tar.gz"
    formats.make_gce(raw, again)
    assert again.read_bytes() == data


def test_raw_zst_round_trip(raw: Path, tmp_path: Path) -> None:
    out = raw.parent / "disk.raw.zst"
    formats.make_raw_zst(raw, out)
    assert out.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # zstd frame magic
    run(["zstd", "-q", "-t", out])
    back = tmp_path / "back.raw"
    # The documented way to write it to a drive, into a file here.
    run(["sh", "-c", f"zstd -dc '{out}' | dd of='{back}' bs=4M status=none"])
    assert back.stat().st_size == DISK_SIZE
    assert sha256(back) == sha256(raw)
    assert out.stat().st_size < 5 * MiB


def test_write_formats_names_and_lists_every_output(raw: Path) -> None:
    requested = [f for f in OutputFormat if f is not OutputFormat.RAW]
    outputs = formats.write_formats(raw, requested, APPLIANCE)
    assert list(outputs) == [f for f in formats.ORDER if f in requested]
    assert {path.name for path in outputs.values()} == {formats.FILE_NAMES[f] for f in requested}
    # No raw (not requested) and no leftover temporary files: exactly the outputs.
    assert sorted(p.name for p in raw.parent.iterdir()) == sorted(p.name for p in outputs.values())
    listing = json.loads(formats.describe_outputs(outputs, DISK_SIZE))
    assert listing["disk_size"] == DISK_SIZE
    assert set(listing["formats"]) == {str(f) for f in requested}
    for fmt, entry in listing["formats"].items():
        path = outputs[OutputFormat(fmt)]
        assert entry == {
            "file": path.name,
            "size": path.stat().st_size,
            "allocated": allocated(path),
        }


def test_ova_alone_leaves_no_vmdk_and_raw_stays_when_asked(raw: Path) -> None:
    outputs = formats.write_formats(raw, [OutputFormat.RAW, OutputFormat.OVA], APPLIANCE)
    assert sorted(p.name for p in raw.parent.iterdir()) == ["disk.ova", "disk.raw"]
    assert outputs == {OutputFormat.RAW: raw, OutputFormat.OVA: raw.parent / "disk.ova"}


def test_host_tools_per_format() -> None:
    assert formats.host_tools([OutputFormat.RAW]) == ()
    assert formats.host_tools([OutputFormat.QCOW2, OutputFormat.VHD]) == ("qemu-img",)
    assert formats.host_tools([OutputFormat.GCE, OutputFormat.RAW_ZST]) == ("tar", "gzip", "zstd")
    assert set(formats.TOOLS) == set(OutputFormat) == set(formats.FILE_NAMES)


def test_ovf_template_is_strict(tmp_path: Path) -> None:
    broken = tmp_path / "broken.ovf.j2"
    broken.write_text(formats.OVF_TEMPLATE.read_text().replace("appliance.cpus", "appliance.cores"))
    with pytest.raises(ConfigError, match=r"broken\.ovf\.j2: undefined variable.*cores"):
        formats.render_ovf(APPLIANCE, "disk.vmdk", 1, DISK_SIZE, template=broken)
