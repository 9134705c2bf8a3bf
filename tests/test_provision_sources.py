"""Platform detection and every user-data source, against real files, scripts and HTTP servers.

Metadata services are a real HTTP server on 127.0.0.1 that checks what the real ones check
(IMDSv2's session token, GCE's `Metadata-Flavor`, Azure's `Metadata: true`; a
`MetadataServer` from tests/support/misbehaving_server.py); config drives are directories
behind a `Drives` that records mounts, or real FAT images probed by the real blkid.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import logging
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qemu.drives import make_cidata, make_config_drive
from qemu.vm import free_port
from tests.support.misbehaving_server import (
    TOKEN,
    MetadataServer,
    Misbehaviour,
    refusing_port,
    silent_port,
)
from updater import run
from updater.provision.__main__ import main as provision_main
from updater.provision.plan import ProvisionError
from updater.provision.sources import (
    AZURE_ASSET_TAG,
    IGNITION_PLATFORMS,
    MAX_USER_DATA,
    Drives,
    Platform,
    SourceEnv,
    SystemDrives,
    UserData,
    decode_guestinfo,
    detect_platform,
    find_user_data,
    kernel_arguments,
    parse_ovf_custom_data,
)

IGNITION = b'{"ignition": {"version": "3.4.0"}}'
CLOUD_CONFIG = b"#cloud-config\nhostname: berth-1\n"
REFUSED = "Failed to establish a new connection: [Errno 111] Connection refused"

# Platform detection


def write_dmi(root: Path, **values: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, value in values.items():
        (root / name).write_text(value + "\n")
    return root


@pytest.mark.parametrize("platform", list(Platform))
def test_berth_platform_argument_names_each_platform(platform: Platform, tmp_path: Path) -> None:
    dmi = write_dmi(tmp_path / "dmi", sys_vendor="QEMU")
    assert detect_platform(f"quiet berth.platform={platform} ro", dmi) is platform


@pytest.mark.parametrize(("name", "platform"), sorted(IGNITION_PLATFORMS.items()))
def test_ignition_platform_ids_are_understood(
    name: str, platform: Platform, tmp_path: Path
) -> None:
    assert detect_platform(f"ignition.platform.id={name}", tmp_path / "none") is platform


def test_ignition_names_map_to_berth_names() -> None:
    assert IGNITION_PLATFORMS["aws"] is Platform.EC2
    assert IGNITION_PLATFORMS["gcp"] is Platform.GCE
    assert set(IGNITION_PLATFORMS.values()) == set(Platform)


@pytest.mark.parametrize(
    "cmdline",
    [
        "berth.platform=gce ignition.platform.id=aws",
        "ignition.platform.id=aws berth.platform=gce",
        "berth.platform=ec2 berth.platform=gce",
        'berth.platform="gce" console=ttyS0',
        '"berth.platform=gce"',
    ],
)
def test_berth_argument_wins_and_the_last_counts(cmdline: str, tmp_path: Path) -> None:
    assert detect_platform(cmdline, tmp_path) is Platform.GCE


def test_command_line_overrides_dmi(tmp_path: Path) -> None:
    dmi = write_dmi(tmp_path, sys_vendor="Amazon EC2")
    assert detect_platform("berth.platform=metal", dmi) is Platform.METAL


@pytest.mark.parametrize("value", ["aws", "digitalocean", "", "QEMU"])
def test_unknown_berth_platform_is_refused_with_the_allowed_names(
    value: str, tmp_path: Path
) -> None:
    with pytest.raises(ProvisionError) as e:
        detect_platform(f"berth.platform={value}", tmp_path)
    message = str(e.value)
    assert f"berth.platform={value}:" in message
    assert "qemu, ec2, gce, azure, vmware, openstack, metal" in message


def test_bare_berth_platform_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match=r"berth\.platform="):
        detect_platform("berth.platform", tmp_path)


def test_unknown_ignition_platform_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError) as e:
        detect_platform("ignition.platform.id=digitalocean", tmp_path)
    assert "ignition.platform.id=digitalocean" in str(e.value)
    assert "aws" in str(e.value) and "gcp" in str(e.value)


def test_kernel_arguments_group_quotes() -> None:
    assert kernel_arguments('a=1  b="x y" "c=z" flag d=') == [
        ("a", "1"),
        ("b", "x y"),
        ("c", "z"),
        ("flag", None),
        ("d", ""),
    ]


def test_similar_argument_names_are_not_the_platform(tmp_path: Path) -> None:
    dmi = write_dmi(tmp_path, sys_vendor="QEMU")
    assert detect_platform("berth.platformx=ec2 xberth.platform=ec2", dmi) is Platform.QEMU


@pytest.mark.parametrize(
    ("dmi", "platform"),
    [
        ({"sys_vendor": "QEMU", "product_name": "Standard PC (Q35 + ICH9, 2009)"}, Platform.QEMU),
        ({"sys_vendor": "Red Hat", "product_name": "QEMU Virtual Machine"}, Platform.QEMU),
        # What `VMConfig(smbios=("type=1,manufacturer=Amazon EC2,product=t3.micro",))` shows.
        (
            {
                "sys_vendor": "Amazon EC2",
                "product_name": "t3.micro",
                "bios_vendor": "EFI Development Kit II / OVMF",
            },
            Platform.EC2,
        ),
        (
            {"sys_vendor": "Xen", "product_name": "HVM domU", "bios_version": "4.11.amazon"},
            Platform.EC2,
        ),
        ({"sys_vendor": "Google", "product_name": "Google Compute Engine"}, Platform.GCE),
        ({"sys_vendor": "Google"}, Platform.GCE),
        ({"product_name": "Google Compute Engine"}, Platform.GCE),
        (
            {
                "sys_vendor": "Microsoft Corporation",
                "product_name": "Virtual Machine",
                "chassis_asset_tag": AZURE_ASSET_TAG,
            },
            Platform.AZURE,
        ),
        # Hyper-V outside Azure has no asset tag; the tag alone, with another vendor, is no Azure.
        (
            {"sys_vendor": "Microsoft Corporation", "product_name": "Virtual Machine"},
            Platform.METAL,
        ),
        ({"sys_vendor": "QEMU", "chassis_asset_tag": AZURE_ASSET_TAG}, Platform.QEMU),
        ({"sys_vendor": "VMware, Inc.", "product_name": "VMware7,1"}, Platform.VMWARE),
        (
            {"sys_vendor": "OpenStack Foundation", "product_name": "OpenStack Nova"},
            Platform.OPENSTACK,
        ),
        # RDO's Nova keeps QEMU as the vendor: the cloud's product name must still win.
        ({"sys_vendor": "QEMU", "product_name": "OpenStack Compute"}, Platform.OPENSTACK),
        ({"sys_vendor": "Dell Inc.", "product_name": "PowerEdge R650"}, Platform.METAL),
        ({}, Platform.METAL),
    ],
)
def test_dmi_detection(dmi: dict[str, str], platform: Platform, tmp_path: Path) -> None:
    assert detect_platform("root=/dev/vda2 quiet", write_dmi(tmp_path / "dmi", **dmi)) is platform


def test_no_dmi_at_all_is_metal(tmp_path: Path) -> None:
    assert detect_platform("", tmp_path / "missing") is Platform.METAL


def test_unreadable_dmi_file_counts_as_empty(tmp_path: Path) -> None:
    dmi = write_dmi(tmp_path, sys_vendor="Amazon EC2")
    (dmi / "product_name").mkdir()  # reading a directory fails like a root-only file would
    assert detect_platform("", dmi) is Platform.EC2


# Config drives as directories


@dataclass
class DirectoryDrives(Drives):
    """Drives backed by directories: device -> (label, fstype, directory). Records mounts."""

    devices: dict[str, tuple[str, str, Path]] = field(default_factory=dict)
    mounts: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    mounted: set[str] = field(default_factory=set)

    def add(self, device: str, label: str, fstype: str, root: Path) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        self.devices[device] = (label, fstype, root)
        return root

    def find(self, *, label: str | None = None, fstype: str | None = None) -> list[str]:
        return [
            device
            for device, (dev_label, dev_type, _) in self.devices.items()
            if (label is not None and dev_label == label)
            or (fstype is not None and dev_type == fstype)
        ]

    @contextlib.contextmanager
    def mount(self, device: str, fstypes: Sequence[str]) -> Iterator[Path]:
        _, fstype, root = self.devices[device]
        if fstype not in fstypes:
            raise ProvisionError(f"mount: {device} is {fstype}, not {', '.join(fstypes)}")
        self.mounts.append((device, tuple(fstypes)))
        self.mounted.add(device)
        try:
            yield root
        finally:
            self.mounted.remove(device)


@pytest.fixture
def drives() -> DirectoryDrives:
    return DirectoryDrives()


def env_for(tmp_path: Path, drives: Drives, **kwargs: object) -> SourceEnv:
    """An environment where nothing is found unless the test puts it there."""
    fw_cfg = tmp_path / "fw_cfg"
    fw_cfg.mkdir(exist_ok=True)
    options: dict[str, object] = {
        "fw_cfg_dir": fw_cfg,
        "drives": drives,
        "metadata_url": "http://127.0.0.1:9",  # discard port: fails fast if a test forgets
        "metadata_wait": 0.0,
        "modprobe": ("false",),
        "rpctool": str(tmp_path / "no-rpctool"),
    }
    options.update(kwargs)
    return SourceEnv(**options)  # type: ignore[arg-type]


def test_nocloud_drive_with_meta_data(tmp_path: Path, drives: DirectoryDrives) -> None:
    root = drives.add("/dev/vdb", "cidata", "vfat", tmp_path / "cidata")
    (root / "user-data").write_bytes(CLOUD_CONFIG)
    (root / "meta-data").write_text("instance-id: i-42\nlocal-hostname: node-1\nother: x\n")
    found = find_user_data(Platform.METAL, env=env_for(tmp_path, drives))
    assert found == UserData(
        CLOUD_CONFIG,
        "NoCloud drive /dev/vdb user-data",
        {"instance-id": "i-42", "local-hostname": "node-1"},
    )
    assert drives.mounts == [("/dev/vdb", ("vfat", "iso9660"))]
    assert not drives.mounted


@pytest.mark.parametrize(("label", "fstype"), [("CIDATA", "iso9660"), ("cidata", "iso9660")])
def test_nocloud_labels_and_iso9660(
    label: str, fstype: str, tmp_path: Path, drives: DirectoryDrives
) -> None:
    root = drives.add("/dev/sr0", label, fstype, tmp_path / "cd")
    (root / "user-data").write_bytes(IGNITION)
    found = find_user_data(Platform.EC2, env=env_for(tmp_path, drives))
    assert found is not None and found.data == IGNITION and found.meta == {}


def test_nocloud_meta_data_may_be_json_and_ids_numbers(
    tmp_path: Path, drives: DirectoryDrives
) -> None:
    root = drives.add("/dev/vdb", "cidata", "vfat", tmp_path / "cidata")
    (root / "user-data").write_bytes(IGNITION)
    (root / "meta-data").write_text('{"instance-id": 1234}')
    found = find_user_data(Platform.METAL, env=env_for(tmp_path, drives))
    assert found is not None and found.meta == {"instance-id": "1234"}


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ("instance-id: [a\n", "meta-data: not valid YAML"),
        ("- a\n- b\n", "meta-data: \\(document\\): expected a mapping"),
        ("local-hostname: [a, b]\n", "meta-data: local-hostname: expected a string"),
        ("instance-id: true\n", "meta-data: instance-id: expected a string"),
    ],
)
def test_bad_nocloud_meta_data_is_refused(
    meta: str, message: str, tmp_path: Path, drives: DirectoryDrives
) -> None:
    root = drives.add("/dev/vdb", "cidata", "vfat", tmp_path / "cidata")
    (root / "user-data").write_bytes(IGNITION)
    (root / "meta-data").write_text(meta)
    with pytest.raises(ProvisionError, match="NoCloud drive /dev/vdb " + message):
        find_user_data(Platform.METAL, env=env_for(tmp_path, drives))
    assert not drives.mounted


def test_drive_without_user_data_is_noted_and_skipped(
    tmp_path: Path, drives: DirectoryDrives, caplog: pytest.LogCaptureFixture
) -> None:
    root = drives.add("/dev/vdb", "cidata", "vfat", tmp_path / "cidata")
    (root / "meta-data").write_text("instance-id: x\n")
    with caplog.at_level(logging.WARNING, logger="updater.provision.sources"):
        assert find_user_data(Platform.METAL, env=env_for(tmp_path, drives)) is None
    assert "NoCloud drive /dev/vdb has no user-data file" in caplog.text


def test_empty_user_data_is_no_config(
    tmp_path: Path, drives: DirectoryDrives, caplog: pytest.LogCaptureFixture
) -> None:
    root = drives.add("/dev/vdb", "cidata", "vfat", tmp_path / "cidata")
    (root / "user-data").write_bytes(b"\n")
    with caplog.at_level(logging.WARNING):
        assert find_user_data(Platform.METAL, env=env_for(tmp_path, drives)) is None
    assert "NoCloud drive /dev/vdb user-data is empty" in caplog.text


def test_unreadable_user_data_is_an_error_and_the_drive_is_unmounted(
    tmp_path: Path, drives: DirectoryDrives
) -> None:
    root = drives.add("/dev/vdb", "cidata", "vfat", tmp_path / "cidata")
    (root / "user-data").mkdir()
    with pytest.raises(ProvisionError, match="NoCloud drive /dev/vdb: cannot read user-data"):
        find_user_data(Platform.METAL, env=env_for(tmp_path, drives))
    assert drives.mounts and not drives.mounted


def test_several_drives_use_the_first_and_say_so(tmp_path: Path, drives: DirectoryDrives) -> None:
    for device in ("/dev/vdb", "/dev/vdc"):
        root = drives.add(device, "cidata", "vfat", tmp_path / device.rsplit("/", 1)[1])
        (root / "user-data").write_bytes(device.encode())
    found = find_user_data(Platform.METAL, env=env_for(tmp_path, drives))
    assert found is not None and found.data == b"/dev/vdb"
    assert found.notes == ("several NoCloud (cidata) drives (/dev/vdb, /dev/vdc); using /dev/vdb",)


def test_config_drive(tmp_path: Path, drives: DirectoryDrives) -> None:
    root = drives.add("/dev/vdc", "config-2", "vfat", tmp_path / "cfg")
    latest = root / "openstack" / "latest"
    latest.mkdir(parents=True)
    (latest / "user_data").write_bytes(IGNITION)
    (latest / "meta_data.json").write_text(
        json.dumps({"hostname": "web-1.novalocal", "uuid": "83679162", "name": "web-1"})
    )
    found = find_user_data(Platform.OPENSTACK, env=env_for(tmp_path, drives))
    assert found == UserData(
        IGNITION,
        "OpenStack config drive /dev/vdc openstack/latest/user_data",
        {"local-hostname": "web-1.novalocal", "instance-id": "83679162"},
    )
    assert not drives.mounted


def test_config_drive_uppercase_label_without_meta(tmp_path: Path, drives: DirectoryDrives) -> None:
    root = drives.add("/dev/sr1", "CONFIG-2", "iso9660", tmp_path / "cfg")
    (root / "openstack" / "latest").mkdir(parents=True)
    (root / "openstack" / "latest" / "user_data").write_bytes(IGNITION)
    found = find_user_data(Platform.METAL, env=env_for(tmp_path, drives))
    assert found is not None and found.meta == {}


@pytest.mark.parametrize(
    ("meta", "message"),
    [("{", "not valid JSON"), ("[]", "expected a JSON object"), ('{"hostname": 5.5}', "hostname")],
)
def test_bad_config_drive_meta_is_refused(
    meta: str, message: str, tmp_path: Path, drives: DirectoryDrives
) -> None:
    root = drives.add("/dev/vdc", "config-2", "vfat", tmp_path / "cfg")
    latest = root / "openstack" / "latest"
    latest.mkdir(parents=True)
    (latest / "user_data").write_bytes(IGNITION)
    (latest / "meta_data.json").write_text(meta)
    with pytest.raises(ProvisionError, match=f"meta_data.json: .*{message}"):
        find_user_data(Platform.METAL, env=env_for(tmp_path, drives))


def test_nocloud_comes_before_config_drive(tmp_path: Path, drives: DirectoryDrives) -> None:
    cfg = drives.add("/dev/vdb", "config-2", "vfat", tmp_path / "cfg")
    (cfg / "openstack" / "latest").mkdir(parents=True)
    (cfg / "openstack" / "latest" / "user_data").write_bytes(b"config-2")
    nocloud = drives.add("/dev/vdc", "cidata", "vfat", tmp_path / "nocloud")
    (nocloud / "user-data").write_bytes(b"nocloud")
    found = find_user_data(Platform.METAL, env=env_for(tmp_path, drives))
    assert found is not None and found.data == b"nocloud"


@pytest.mark.parametrize("platform", list(Platform))
def test_nothing_anywhere_is_none(
    platform: Platform, tmp_path: Path, drives: DirectoryDrives, metadata: MetadataServer
) -> None:
    metadata.user_data = None
    metadata.gce_user_data = None
    metadata.azure_user_data = None
    metadata.openstack_user_data = None
    env = env_for(tmp_path, drives, metadata_url=metadata.url)
    assert find_user_data(platform, env=env) is None


# QEMU fw_cfg


def write_fw_cfg(root: Path, name: str, data: bytes) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "raw").write_bytes(data)


def test_fw_cfg_berth_name_first(tmp_path: Path, drives: DirectoryDrives) -> None:
    env = env_for(tmp_path, drives)
    write_fw_cfg(env.fw_cfg_dir, "opt/com.coreos/config", b"coreos")
    write_fw_cfg(env.fw_cfg_dir, "opt/org.berth/config", IGNITION)
    assert find_user_data(Platform.QEMU, env=env) == UserData(
        IGNITION, "QEMU fw_cfg opt/org.berth/config"
    )


def test_fw_cfg_coreos_name(tmp_path: Path, drives: DirectoryDrives) -> None:
    env = env_for(tmp_path, drives)
    write_fw_cfg(env.fw_cfg_dir, "opt/com.coreos/config", IGNITION)
    found = find_user_data(Platform.QEMU, env=env)
    assert found is not None and found.source == "QEMU fw_cfg opt/com.coreos/config"


def test_fw_cfg_beats_a_drive_and_a_drive_follows_it(
    tmp_path: Path, drives: DirectoryDrives
) -> None:
    env = env_for(tmp_path, drives)
    root = drives.add("/dev/vdb", "cidata", "vfat", tmp_path / "cidata")
    (root / "user-data").write_bytes(CLOUD_CONFIG)
    found = find_user_data(Platform.QEMU, env=env)
    assert found is not None and found.source == "NoCloud drive /dev/vdb user-data"
    write_fw_cfg(env.fw_cfg_dir, "opt/org.berth/config", IGNITION)
    found = find_user_data(Platform.QEMU, env=env)
    assert found is not None and found.data == IGNITION
    assert len(drives.mounts) == 1  # the drive was not even looked at the second time


def test_fw_cfg_only_on_qemu(tmp_path: Path, drives: DirectoryDrives) -> None:
    env = env_for(tmp_path, drives)
    write_fw_cfg(env.fw_cfg_dir, "opt/org.berth/config", IGNITION)
    assert find_user_data(Platform.METAL, env=env) is None


def test_empty_fw_cfg_falls_through(tmp_path: Path, drives: DirectoryDrives) -> None:
    env = env_for(tmp_path, drives)
    write_fw_cfg(env.fw_cfg_dir, "opt/org.berth/config", b"")
    write_fw_cfg(env.fw_cfg_dir, "opt/com.coreos/config", IGNITION)
    found = find_user_data(Platform.QEMU, env=env)
    assert found is not None and found.source == "QEMU fw_cfg opt/com.coreos/config"
    assert found.notes == ("QEMU fw_cfg opt/org.berth/config is empty, ignored",)


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_missing_fw_cfg_dir_loads_the_driver(tmp_path: Path, drives: DirectoryDrives) -> None:
    by_name = tmp_path / "sys" / "by_name"
    log = tmp_path / "modprobe.log"
    # Loading the module is what makes the sysfs directory appear.
    modprobe = script(
        tmp_path / "modprobe",
        f'echo "$@" > {log}\nmkdir -p {by_name}/opt/org.berth/config\n'
        f"printf '{IGNITION.decode()}' > {by_name}/opt/org.berth/config/raw\n",
    )
    env = env_for(tmp_path, drives, fw_cfg_dir=by_name, modprobe=(str(modprobe), "qemu_fw_cfg"))
    found = find_user_data(Platform.QEMU, env=env)
    assert found is not None and found.data == IGNITION
    assert log.read_text() == "qemu_fw_cfg\n"


def test_failing_modprobe_is_an_error(tmp_path: Path, drives: DirectoryDrives) -> None:
    modprobe = script(
        tmp_path / "modprobe", "echo 'modprobe: FATAL: Module qemu_fw_cfg not found' >&2\nexit 1\n"
    )
    env = env_for(tmp_path, drives, fw_cfg_dir=tmp_path / "absent", modprobe=(str(modprobe),))
    with pytest.raises(ProvisionError) as e:
        find_user_data(Platform.QEMU, env=env)
    assert "qemu_fw_cfg kernel module" in str(e.value)
    assert "exit status 1: modprobe: FATAL: Module qemu_fw_cfg not found" in str(e.value)


def test_absent_modprobe_is_an_error(tmp_path: Path, drives: DirectoryDrives) -> None:
    env = env_for(
        tmp_path, drives, fw_cfg_dir=tmp_path / "absent", modprobe=(str(tmp_path / "nope"),)
    )
    with pytest.raises(ProvisionError, match="nope is not installed"):
        find_user_data(Platform.QEMU, env=env)


def test_no_fw_cfg_device_is_noted(
    tmp_path: Path, drives: DirectoryDrives, caplog: pytest.LogCaptureFixture
) -> None:
    env = env_for(tmp_path, drives, fw_cfg_dir=tmp_path / "absent", modprobe=("true",))
    with caplog.at_level(logging.WARNING):
        assert find_user_data(Platform.QEMU, env=env) is None
    assert "no fw_cfg device" in caplog.text


# Metadata servers


@pytest.fixture
def metadata() -> Iterator[MetadataServer]:
    with MetadataServer() as server:
        server.user_data = CLOUD_CONFIG
        server.gce_user_data = IGNITION
        server.azure_user_data = base64.b64encode(IGNITION)
        server.openstack_user_data = IGNITION
        yield server


def metadata_env(tmp_path: Path, metadata: MetadataServer, **kwargs: object) -> SourceEnv:
    return env_for(tmp_path, DirectoryDrives(), metadata_url=metadata.url, **kwargs)


def test_ec2_imdsv2(tmp_path: Path, metadata: MetadataServer) -> None:
    found = find_user_data(Platform.EC2, env=metadata_env(tmp_path, metadata))
    assert found == UserData(
        CLOUD_CONFIG,
        "EC2 IMDSv2 user-data",
        {"instance-id": "i-0abc", "local-hostname": "ip-10-0-0-5"},
    )
    assert metadata.paths() == [
        "PUT /latest/api/token",
        "GET /latest/user-data",
        "GET /latest/meta-data/instance-id",
        "GET /latest/meta-data/local-hostname",
    ]
    assert metadata.seen[0].headers["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"
    assert all(s.headers["x-aws-ec2-metadata-token"] == TOKEN for s in metadata.seen[1:])


def test_ec2_without_user_data(
    tmp_path: Path, metadata: MetadataServer, caplog: pytest.LogCaptureFixture
) -> None:
    metadata.user_data = None
    with caplog.at_level(logging.WARNING):
        assert find_user_data(Platform.EC2, env=metadata_env(tmp_path, metadata)) is None
    assert "EC2: the instance has no user data" in caplog.text
    assert metadata.paths()[-1] == "GET /latest/user-data"


def test_ec2_meta_data_is_optional(tmp_path: Path, metadata: MetadataServer) -> None:
    metadata.ec2_meta = {}
    found = find_user_data(Platform.EC2, env=metadata_env(tmp_path, metadata))
    assert found is not None and found.meta == {}


def test_ec2_rejected_token_is_an_error_naming_url_and_status(
    tmp_path: Path, metadata: MetadataServer
) -> None:
    metadata.token = "stale"  # the server hands out a token it then does not accept
    with pytest.raises(ProvisionError) as e:
        find_user_data(Platform.EC2, env=metadata_env(tmp_path, metadata, metadata_wait=30))
    assert str(e.value) == (
        f"EC2 metadata service: GET {metadata.url}/latest/user-data answered HTTP 401 Unauthorized"
    )


def test_ec2_token_endpoint_missing_is_an_error(tmp_path: Path, metadata: MetadataServer) -> None:
    metadata.rules.append(Misbehaviour("/latest/api/token", status=404))
    with pytest.raises(ProvisionError, match="no IMDSv2 session token"):
        find_user_data(Platform.EC2, env=metadata_env(tmp_path, metadata))


def test_ec2_imdsv1_only_service_is_an_error(tmp_path: Path, metadata: MetadataServer) -> None:
    metadata.rules.append(Misbehaviour("/latest/api/token", status=403))
    with pytest.raises(ProvisionError, match=r"PUT .*/latest/api/token answered HTTP 403"):
        find_user_data(Platform.EC2, env=metadata_env(tmp_path, metadata))


def test_a_drive_is_used_before_the_metadata_service(
    tmp_path: Path, metadata: MetadataServer, drives: DirectoryDrives
) -> None:
    root = drives.add("/dev/vdb", "cidata", "vfat", tmp_path / "cidata")
    (root / "user-data").write_bytes(IGNITION)
    env = env_for(tmp_path, drives, metadata_url=metadata.url)
    for platform in (Platform.EC2, Platform.GCE, Platform.AZURE, Platform.OPENSTACK):
        found = find_user_data(platform, env=env)
        assert found is not None and found.source == "NoCloud drive /dev/vdb user-data"
    assert metadata.seen == []


def test_server_errors_are_retried(tmp_path: Path, metadata: MetadataServer) -> None:
    metadata.rules.append(Misbehaviour(status=503, times=2))
    found = find_user_data(Platform.EC2, env=metadata_env(tmp_path, metadata, metadata_wait=30))
    assert found is not None and found.data == CLOUD_CONFIG
    assert metadata.paths()[:3] == ["PUT /latest/api/token"] * 3


def test_a_service_that_comes_up_late_is_waited_for(tmp_path: Path) -> None:
    port = free_port()
    started: list[MetadataServer] = []

    def start_later() -> None:
        time.sleep(0.8)  # the guest's network is still coming up
        server = MetadataServer(port)
        server.gce_user_data = IGNITION
        started.append(server.start())

    threading.Thread(target=start_later, daemon=True).start()
    env = env_for(
        tmp_path, DirectoryDrives(), metadata_url=f"http://127.0.0.1:{port}", metadata_wait=30
    )
    try:
        found = find_user_data(Platform.GCE, env=env)
    finally:
        if started:
            started[0].stop()
    assert found is not None and found.data == IGNITION


def test_unreachable_service_stops_the_boot(tmp_path: Path) -> None:
    with refusing_port() as port:
        env = env_for(
            tmp_path, DirectoryDrives(), metadata_url=f"http://127.0.0.1:{port}/", metadata_wait=0.6
        )
        start = time.monotonic()
        with pytest.raises(ProvisionError) as e:
            find_user_data(Platform.EC2, env=env)
        assert 0.6 <= time.monotonic() - start < 5
    message = str(e.value)
    assert message.startswith(
        f"EC2 metadata service at http://127.0.0.1:{port} did not answer within 0.6 s: "
        f"PUT http://127.0.0.1:{port}/latest/api/token: "
    )
    # The reason, without urllib3's reprs of its pool and connection in front of it.
    assert message.endswith(f"/latest/api/token: {REFUSED}")


def test_a_silent_service_times_out_and_stops_the_boot(tmp_path: Path) -> None:
    with silent_port() as port:
        url = f"http://127.0.0.1:{port}"
        env = env_for(
            tmp_path, DirectoryDrives(), metadata_url=url, metadata_wait=0.5, request_timeout=0.2
        )
        with pytest.raises(ProvisionError) as e:
            find_user_data(Platform.GCE, env=env)
    assert str(e.value).startswith(f"GCE metadata server at {url} did not answer within 0.5 s")
    assert "timed out" in str(e.value)


def test_lasting_server_errors_stop_the_boot(tmp_path: Path, metadata: MetadataServer) -> None:
    metadata.rules.append(Misbehaviour(status=503))
    with pytest.raises(ProvisionError) as e:
        find_user_data(Platform.OPENSTACK, env=metadata_env(tmp_path, metadata, metadata_wait=0.5))
    assert str(e.value) == (
        f"OpenStack metadata service at {metadata.url} did not answer within 0.5 s: "
        f"GET {metadata.url}/openstack/latest/user_data answered HTTP 503 Service Unavailable"
    )
    assert len(metadata.seen) >= 2


def test_a_tls_failure_is_not_waited_out(tmp_path: Path, metadata: MetadataServer) -> None:
    """The same rule as Ignition's remote contents (http.request_errors): waiting does not fix
    a certificate. Real metadata services speak plain HTTP; this one is asked for TLS."""
    url = metadata.url.replace("http://", "https://")
    env = env_for(tmp_path, DirectoryDrives(), metadata_url=url, metadata_wait=10)
    started = time.monotonic()
    with pytest.raises(ProvisionError) as e:
        find_user_data(Platform.GCE, env=env)
    assert time.monotonic() - started < 5
    assert str(e.value).startswith(
        f"GCE metadata server: GET {url}/computeMetadata/v1/instance/attributes/user-data: "
        "TLS failed: "
    )


def test_redirects_are_not_followed(tmp_path: Path, metadata: MetadataServer) -> None:
    metadata.rules.append(
        Misbehaviour("/computeMetadata/v1/instance/attributes/user-data", status=302)
    )
    with pytest.raises(ProvisionError, match="answered HTTP 302"):
        find_user_data(Platform.GCE, env=metadata_env(tmp_path, metadata))


def test_gce(tmp_path: Path, metadata: MetadataServer) -> None:
    found = find_user_data(Platform.GCE, env=metadata_env(tmp_path, metadata))
    assert found == UserData(IGNITION, "GCE metadata user-data")
    assert metadata.paths() == ["GET /computeMetadata/v1/instance/attributes/user-data"]
    assert metadata.seen[0].headers["metadata-flavor"] == "Google"


def test_gce_without_user_data(tmp_path: Path, metadata: MetadataServer) -> None:
    metadata.gce_user_data = None
    assert find_user_data(Platform.GCE, env=metadata_env(tmp_path, metadata)) is None


def test_gce_answer_without_flavor_header_is_refused(
    tmp_path: Path, metadata: MetadataServer
) -> None:
    metadata.gce_flavor = False
    with pytest.raises(ProvisionError, match="without the header 'Metadata-Flavor: Google'"):
        find_user_data(Platform.GCE, env=metadata_env(tmp_path, metadata))


def test_azure_imds_user_data(tmp_path: Path, metadata: MetadataServer) -> None:
    found = find_user_data(Platform.AZURE, env=metadata_env(tmp_path, metadata))
    assert found == UserData(IGNITION, "Azure IMDS userData")
    assert metadata.paths() == [
        "GET /metadata/instance/compute/userData?api-version=2021-01-01&format=text"
    ]
    assert metadata.seen[0].headers["metadata"] == "true"


def test_azure_empty_user_data_is_none(tmp_path: Path, metadata: MetadataServer) -> None:
    metadata.azure_user_data = b""
    assert find_user_data(Platform.AZURE, env=metadata_env(tmp_path, metadata)) is None


def test_azure_user_data_must_be_base64(tmp_path: Path, metadata: MetadataServer) -> None:
    metadata.azure_user_data = b"{not base64}"
    with pytest.raises(ProvisionError, match="Azure IMDS userData: expected base64"):
        find_user_data(Platform.AZURE, env=metadata_env(tmp_path, metadata))


def ovf_env(custom_data: str | None) -> bytes:
    element = "" if custom_data is None else f"<CustomData>{custom_data}</CustomData>"
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<ns0:Environment xmlns:ns0="http://schemas.dmtf.org/ovf/environment/1" '
        'xmlns:ns1="http://schemas.microsoft.com/windowsazure">'
        "<ns1:ProvisioningSection><ns1:Version>1.0</ns1:Version>"
        '<ns1:LinuxProvisioningConfigurationSet xmlns="http://schemas.microsoft.com/windowsazure">'
        "<ConfigurationSetType>LinuxProvisioningConfiguration</ConfigurationSetType>"
        f"<HostName>azvm</HostName>{element}"
        "</ns1:LinuxProvisioningConfigurationSet></ns1:ProvisioningSection></ns0:Environment>"
    ).encode()


@pytest.mark.parametrize("fstype", ["udf", "iso9660"])
def test_azure_custom_data_on_the_provisioning_cd(
    fstype: str, tmp_path: Path, metadata: MetadataServer
) -> None:
    drives = DirectoryDrives()
    root = drives.add("/dev/sr0", "rd_rdfe_stable.230101-0000", fstype, tmp_path / "cd")
    encoded = base64.b64encode(IGNITION).decode()
    (root / "ovf-env.xml").write_bytes(ovf_env(encoded[:10] + "\n  " + encoded[10:]))
    env = env_for(tmp_path, drives, metadata_url=metadata.url)
    found = find_user_data(Platform.AZURE, env=env)
    assert found == UserData(IGNITION, "Azure custom data (ovf-env.xml on /dev/sr0)")
    assert drives.mounts == [("/dev/sr0", ("udf", "iso9660"))] and not drives.mounted
    assert metadata.seen == []


def test_azure_cd_without_custom_data_falls_back_to_imds(
    tmp_path: Path, metadata: MetadataServer
) -> None:
    drives = DirectoryDrives()
    other = drives.add("/dev/sr1", "DATA", "udf", tmp_path / "other")
    (other / "README").write_text("no ovf here")
    root = drives.add("/dev/sr0", "rd_rdfe_stable", "udf", tmp_path / "cd")
    (root / "ovf-env.xml").write_bytes(ovf_env(None))
    found = find_user_data(Platform.AZURE, env=env_for(tmp_path, drives, metadata_url=metadata.url))
    assert found is not None and found.source == "Azure IMDS userData"
    assert "Azure: ovf-env.xml on /dev/sr0 has no custom data" in found.notes
    assert [device for device, _ in drives.mounts] == ["/dev/sr1", "/dev/sr0"]


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        (b"<Environment><CustomData>", "not valid XML"),
        (ovf_env("!!!"), "CustomData: expected base64"),
    ],
)
def test_bad_ovf_env_is_refused(xml: bytes, message: str) -> None:
    with pytest.raises(ProvisionError, match=message):
        parse_ovf_custom_data(xml, "ovf-env.xml")


def test_ovf_custom_data_empty_is_none() -> None:
    assert parse_ovf_custom_data(ovf_env(""), "ovf-env.xml") is None


def test_openstack_metadata_service(tmp_path: Path, metadata: MetadataServer) -> None:
    found = find_user_data(Platform.OPENSTACK, env=metadata_env(tmp_path, metadata))
    assert found == UserData(IGNITION, "OpenStack metadata user_data")
    metadata.openstack_user_data = None
    assert find_user_data(Platform.OPENSTACK, env=metadata_env(tmp_path, metadata)) is None


def test_metadata_answer_size_is_bounded(tmp_path: Path, metadata: MetadataServer) -> None:
    metadata.gce_user_data = b"x" * ((16 << 20) + 1)
    with pytest.raises(ProvisionError, match="answer larger than 16 MiB"):
        find_user_data(Platform.GCE, env=metadata_env(tmp_path, metadata))


def test_environment_proxies_are_ignored(
    tmp_path: Path, metadata: MetadataServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert find_user_data(Platform.GCE, env=metadata_env(tmp_path, metadata)) is not None


# VMware guestinfo


def fake_rpctool(tmp_path: Path, values: dict[str, str], *, broken: bool = False) -> Path:
    """A vmware-rpctool that answers `info-get guestinfo.KEY` from files, like the real one."""
    store = tmp_path / "guestinfo"
    store.mkdir(exist_ok=True)
    for key, value in values.items():
        (store / key).write_text(value)
    if broken:
        return script(
            tmp_path / "vmware-rpctool", "echo 'Failed sending message to VMware.' >&2\nexit 1\n"
        )
    return script(
        tmp_path / "vmware-rpctool",
        'key="${1#info-get guestinfo.}"\n'
        f'if [ -f "{store}/$key" ]; then cat "{store}/$key"; echo; exit 0; fi\n'
        "echo 'No value found' >&2\nexit 1\n",
    )


def vmware_env(tmp_path: Path, values: dict[str, str], **kwargs: bool) -> SourceEnv:
    tool = fake_rpctool(tmp_path, values, **kwargs)
    return env_for(tmp_path, DirectoryDrives(), rpctool=str(tool))


def test_vmware_ignition_config_data_raw(tmp_path: Path) -> None:
    env = vmware_env(tmp_path, {"ignition.config.data": IGNITION.decode(), "userdata": "no"})
    assert find_user_data(Platform.VMWARE, env=env) == UserData(
        IGNITION, "VMware guestinfo.ignition.config.data"
    )


@pytest.mark.parametrize("encoding", ["base64", "b64"])
def test_vmware_base64(encoding: str, tmp_path: Path) -> None:
    values = {
        "ignition.config.data": base64.b64encode(IGNITION).decode(),
        "ignition.config.data.encoding": encoding,
    }
    found = find_user_data(Platform.VMWARE, env=vmware_env(tmp_path, values))
    assert found is not None and found.data == IGNITION


@pytest.mark.parametrize("encoding", ["gzip+base64", "gz+b64"])
def test_vmware_userdata_gzip_base64(encoding: str, tmp_path: Path) -> None:
    values = {
        "userdata": base64.b64encode(gzip.compress(CLOUD_CONFIG)).decode(),
        "userdata.encoding": encoding,
    }
    assert find_user_data(Platform.VMWARE, env=vmware_env(tmp_path, values)) == UserData(
        CLOUD_CONFIG, "VMware guestinfo.userdata"
    )


def test_vmware_cleared_key_is_skipped(tmp_path: Path) -> None:
    values = {"ignition.config.data": "---", "userdata": CLOUD_CONFIG.decode()}
    found = find_user_data(Platform.VMWARE, env=vmware_env(tmp_path, values))
    assert found is not None and found.source == "VMware guestinfo.userdata"


def test_vmware_without_guestinfo_is_none(tmp_path: Path) -> None:
    assert find_user_data(Platform.VMWARE, env=vmware_env(tmp_path, {})) is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"userdata": "x", "userdata.encoding": "rot13"}, "userdata.encoding: unknown encoding"),
        ({"userdata": "%%%", "userdata.encoding": "base64"}, "userdata: expected base64"),
        ({"userdata": "aGVsbG8=", "userdata.encoding": "gzip+base64"}, "userdata: not gzip"),
    ],
)
def test_vmware_bad_encodings_are_refused(
    values: dict[str, str], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ProvisionError, match=f"VMware guestinfo.{message}"):
        find_user_data(Platform.VMWARE, env=vmware_env(tmp_path, values))


def test_vmware_rpctool_failure_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="Failed sending message to VMware"):
        find_user_data(Platform.VMWARE, env=vmware_env(tmp_path, {}, broken=True))


def test_vmware_without_open_vm_tools_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = env_for(tmp_path, DirectoryDrives(), rpctool=str(tmp_path / "vmware-rpctool"))
    with caplog.at_level(logging.WARNING):
        assert find_user_data(Platform.VMWARE, env=env) is None
    assert "open-vm-tools" in caplog.text and "guestinfo" in caplog.text


def test_decode_guestinfo_raw_keeps_bytes() -> None:
    assert decode_guestinfo(b"\x00raw\n", "", "x") == b"\x00raw\n"


# The real system drives: blkid on FAT images; mount/umount stand-ins that log what they get


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path]:
    cidata = make_cidata(tmp_path / "seed.img", CLOUD_CONFIG, "instance-id: i-1\n")
    config2 = make_config_drive(tmp_path / "config2.img", IGNITION, {"uuid": "u-1"})
    return cidata, config2


def stand_ins_first(monkeypatch: pytest.MonkeyPatch, bin_dir: Path) -> None:
    """Put the tools in `bin_dir` ahead of the system's where the provisioner looks them up.

    Commands run with updater.run's fixed PATH (/usr/sbin included), never the test's own.
    """
    monkeypatch.setattr(run, "PATH", f"{bin_dir}:{run.PATH}")


def test_system_drives_find_by_label_and_type(images: tuple[Path, Path], tmp_path: Path) -> None:
    cidata, config2 = images
    drives = SystemDrives(candidates=(str(cidata), str(config2), str(tmp_path / "missing")))
    assert drives.find(label="cidata") == [str(cidata)]
    assert drives.find(label="config-2") == [str(config2)]
    assert drives.find(label="CIDATA") == []  # labels match exactly; the sources ask for both
    assert drives.find(fstype="vfat") == [str(cidata), str(config2)]
    assert drives.find(fstype="iso9660") == []


def fake_mount_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **fail: str) -> Path:
    """mount/umount stand-ins: mount copies the "device" directory onto the target."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "tools.log"
    script(
        bin_dir / "mount",
        f'echo "mount $*" >> {log}\n{fail.get("mount", "")}\n'
        'for last; do :; done\neval "dev=\\${$(($#-1))}"\ncp -r "$dev"/. "$last"/\n',
    )
    script(
        bin_dir / "umount",
        f'echo "umount $*" >> {log}\n{fail.get("umount", "")}\n'
        'for last; do :; done\nfind "$last" -mindepth 1 -delete\n',
    )
    stand_ins_first(monkeypatch, bin_dir)
    return log


def logged_targets(log: Path) -> list[tuple[str, str]]:
    """(command and options, mount point) per logged call."""
    return [tuple(line.rsplit(" ", 1)) for line in log.read_text().splitlines()]  # type: ignore[misc]


def test_system_drives_mount_read_only_and_always_unmount(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = fake_mount_tools(tmp_path, monkeypatch)
    device = tmp_path / "device"
    device.mkdir()
    (device / "user-data").write_bytes(IGNITION)
    (tmp_path / "run").mkdir()
    drives = SystemDrives(mount_root=tmp_path / "run")
    with drives.mount(str(device), ("vfat", "iso9660")) as root:
        assert (root / "user-data").read_bytes() == IGNITION
        assert root.parent == tmp_path / "run"
    with pytest.raises(RuntimeError), drives.mount(str(device), ("vfat",)) as second:
        raise RuntimeError("reading failed")
    assert logged_targets(log) == [
        (f"mount -o ro,nosuid,nodev,noexec -t vfat,iso9660 {device}", str(root)),
        ("umount", str(root)),
        (f"mount -o ro,nosuid,nodev,noexec -t vfat {device}", str(second)),
        ("umount", str(second)),
    ]
    assert list((tmp_path / "run").iterdir()) == []  # mount points removed


def test_failed_mount_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_mount_tools(
        tmp_path, monkeypatch, mount="echo 'mount: wrong fs type, bad superblock' >&2; exit 32"
    )
    (tmp_path / "run").mkdir()
    drives = SystemDrives(mount_root=tmp_path / "run")
    with pytest.raises(ProvisionError) as e, drives.mount("/dev/vdb", ("vfat", "iso9660")):
        pass
    assert str(e.value).startswith("mounting /dev/vdb: mount -o ro,nosuid,nodev,noexec")
    assert "exit status 32: mount: wrong fs type, bad superblock" in str(e.value)
    assert list((tmp_path / "run").iterdir()) == []


def test_busy_mount_is_unmounted_lazily(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = fake_mount_tools(
        tmp_path,
        monkeypatch,
        umount='case "$1" in --lazy) ;; *) echo "umount: target is busy." >&2; exit 32;; esac',
    )
    (tmp_path / "device").mkdir()
    (tmp_path / "run").mkdir()
    with SystemDrives(mount_root=tmp_path / "run").mount(
        str(tmp_path / "device"), ("vfat",)
    ) as root:
        pass
    assert logged_targets(log)[1:] == [("umount", str(root)), ("umount --lazy", str(root))]
    assert list((tmp_path / "run").iterdir()) == []


def test_stuck_mount_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_mount_tools(tmp_path, monkeypatch, umount='echo "umount: target is busy." >&2; exit 32')
    (tmp_path / "device").mkdir()
    (tmp_path / "run").mkdir()
    with (
        pytest.raises(ProvisionError, match=r"unmounting .*target is busy"),
        SystemDrives(mount_root=tmp_path / "run").mount(str(tmp_path / "device"), ("vfat",)),
    ):
        pass


def test_blkid_failure_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script(bin_dir / "blkid", "echo 'blkid: out of memory' >&2\nexit 4\n")
    stand_ins_first(monkeypatch, bin_dir)
    with pytest.raises(ProvisionError, match="exit status 4: blkid: out of memory"):
        SystemDrives().find(label="cidata")


def test_real_cidata_image_through_find_user_data(
    images: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """blkid finds the image made by qemu.drives; the mount stand-in unpacks it with mtools."""
    cidata, config2 = images
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # mount: copy the FAT image's files out with mcopy, as the kernel would show them.
    script(
        bin_dir / "mount",
        'for last; do :; done\neval "dev=\\${$(($#-1))}"\n'
        'MTOOLS_SKIP_CHECK=1 mcopy -s -n -i "$dev" ::/ "$last"/\n',
    )
    script(bin_dir / "umount", 'find "$1" -mindepth 1 -delete\n')
    stand_ins_first(monkeypatch, bin_dir)
    (tmp_path / "run").mkdir()
    drives = SystemDrives(mount_root=tmp_path / "run", candidates=(str(cidata), str(config2)))
    found = find_user_data(Platform.METAL, env=env_for(tmp_path, drives))
    assert found == UserData(
        CLOUD_CONFIG, f"NoCloud drive {cidata} user-data", {"instance-id": "i-1"}
    )
    drives = SystemDrives(mount_root=tmp_path / "run", candidates=(str(config2),))
    found = find_user_data(Platform.METAL, env=env_for(tmp_path, drives))
    assert found is not None and found.data == IGNITION and found.meta == {"instance-id": "u-1"}


# Configs of any size on drives and fw_cfg: refused past MAX_USER_DATA, never read whole


def _huge(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(MAX_USER_DATA + 1)  # sparse: costs nothing to make
    return path


def test_a_huge_user_data_on_a_drive_is_refused(tmp_path: Path, drives: DirectoryDrives) -> None:
    root = drives.add("/dev/vdb", "cidata", "vfat", tmp_path / "cidata")
    _huge(root / "user-data")
    with pytest.raises(ProvisionError) as info:
        find_user_data(Platform.METAL, env=env_for(tmp_path, drives))
    assert (
        str(info.value) == "NoCloud drive /dev/vdb: user-data: expected a config of at most 16 MiB"
    )


def test_a_huge_fw_cfg_blob_is_refused(tmp_path: Path, drives: DirectoryDrives) -> None:
    env = env_for(tmp_path, drives)
    _huge(env.fw_cfg_dir / "opt/org.berth/config/raw")
    with pytest.raises(ProvisionError) as info:
        find_user_data(Platform.QEMU, env=env)
    assert str(info.value) == (
        "QEMU fw_cfg opt/org.berth/config: raw: expected a config of at most 16 MiB"
    )


def test_check_of_an_endless_file_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert provision_main(["--check", "/dev/zero"]) == 1
    assert capsys.readouterr().out == (
        "berth-provision: FAILED: /dev/zero: zero: expected a config of at most 16 MiB\n"
    )
