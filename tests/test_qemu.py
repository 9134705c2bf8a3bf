"""The VM harness without booting: command lines, overlays, credentials and image lookup.

Its firmware boots are VM tests (tests/vm/test_qemu_vm.py).
"""

from __future__ import annotations

import base64
import socket
import sys
from pathlib import Path

import pytest

from builder.formats import image_info
from builder.run import run
from qemu.__main__ import main
from qemu.ssh import ssh_argv, write_ssh_config
from qemu.vm import (
    OVMF_VARS,
    Accel,
    DiskBus,
    Firmware,
    VMError,
    disk_arguments,
    free_port,
    fw_cfg_argument,
    kvm_probe_passed,
    resolve_disk,
    smbios_credential,
    strip_ansi,
)
from tests.support.vms import blank_disk, option_values, prepared_vm


def decode_credential(value: str) -> tuple[str, bytes]:
    prefix = "type=11,value=io.systemd.credential.binary:"
    assert value.startswith(prefix)
    name, _, encoded = value.removeprefix(prefix).partition("=")
    return name, base64.b64decode(encoded, validate=True)


@pytest.mark.parametrize(
    ("bus", "device"),
    [
        (DiskBus.VIRTIO, "virtio-blk-pci,drive=disk0,serial=berth0,bootindex=1"),
        (DiskBus.NVME, "nvme,drive=disk0,serial=berth0,bootindex=1"),
        (DiskBus.SATA, "ide-hd,drive=disk0,bus=ahci.0,serial=berth0,bootindex=1"),
    ],
)
def test_boot_disk_arguments_per_bus(bus: DiskBus, device: str) -> None:
    args = disk_arguments(0, Path("/images/a,b.qcow2"), "qcow2", bus, boot=True)
    assert args == [
        "-drive",
        "if=none,id=disk0,format=qcow2,file=/images/a,,b.qcow2,discard=unmap",
        "-device",
        device,
    ]


def test_extra_disk_is_not_a_boot_device() -> None:
    args = disk_arguments(2, Path("/x.raw"), "raw", DiskBus.VIRTIO, boot=False)
    assert args[-1] == "virtio-blk-pci,drive=disk2,serial=berth2"


def test_sata_controller_has_six_ports() -> None:
    disk_arguments(5, Path("/x.raw"), "raw", DiskBus.SATA, boot=False)
    with pytest.raises(VMError, match="at most 6"):
        disk_arguments(6, Path("/x.raw"), "raw", DiskBus.SATA, boot=False)


def test_fw_cfg_argument_escapes_commas(tmp_path: Path) -> None:
    config = tmp_path / "a,b.ign"
    config.write_text("{}")
    assert fw_cfg_argument("opt/org.berth/config", config) == (
        f"name=opt/org.berth/config,file={tmp_path}/a,,b.ign"
    )


@pytest.mark.parametrize("name", ["etc/berth", "opt/a,b", "opt/a b", "config"])
def test_fw_cfg_rejects_names_outside_opt(name: str, tmp_path: Path) -> None:
    with pytest.raises(VMError):
        fw_cfg_argument(name, tmp_path / "x")


def test_smbios_credential_is_base64_of_the_value() -> None:
    value = b"ssh-ed25519 AAAA key,with=commas\n"
    name, decoded = decode_credential(smbios_credential("ssh.authorized_keys.root", value))
    assert (name, decoded) == ("ssh.authorized_keys.root", value)


@pytest.mark.parametrize("name", ["", "a=b", "a,b", "a/b", "a b"])
def test_smbios_credential_rejects_bad_names(name: str) -> None:
    with pytest.raises(VMError, match="credential name"):
        smbios_credential(name, b"x")


def test_command_line(tmp_path: Path, blank: Path) -> None:
    extra = blank_disk(tmp_path / "extra.raw", fmt="raw")
    ignition = tmp_path / "config.ign"
    ignition.write_text("{}")
    vm = prepared_vm(
        tmp_path,
        blank,
        memory_mib=1024,
        cpus=3,
        disk_bus=DiskBus.NVME,
        extra_disks=(extra,),
        fw_cfg=(("opt/org.berth/config", ignition),),
        credentials=(("berth.test", "hello world"),),
        authorized_keys=("ssh-ed25519 AAAAdeveloper dev@laptop",),
        no_reboot=True,
        extra_args=("-device", "virtio-balloon-pci"),
        port_forwards=((18080, 8080),),
    )
    argv = vm.command()
    assert argv[0].endswith("qemu-system-x86_64")
    assert option_values(argv, "-machine") == ["q35"]
    assert option_values(argv, "-accel") == ["tcg"]
    assert option_values(argv, "-cpu") == ["max"]
    assert option_values(argv, "-smp") == ["3"]
    assert option_values(argv, "-m") == ["1024"]
    assert "-no-reboot" in argv
    assert argv[-2:] == ["-device", "virtio-balloon-pci"]

    pflash = option_values(argv, "-drive")[:2]
    assert pflash[0].endswith("readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd")
    # Every VM writes its own copy of the variable store, never the system's.
    assert pflash[1].endswith(f"file={tmp_path}/vm/OVMF_VARS.fd")
    assert (tmp_path / "vm" / "OVMF_VARS.fd").read_bytes() == vm.config.ovmf_vars.read_bytes()

    assert option_values(argv, "-nic") == [
        f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{vm.ssh_port}-:22"
        ",hostfwd=tcp:127.0.0.1:18080-:8080"
    ]
    drives = option_values(argv, "-drive")[2:]
    assert drives == [
        f"if=none,id=disk0,format=qcow2,file={tmp_path}/vm/overlay.qcow2,discard=unmap",
        f"if=none,id=disk1,format=raw,file={extra},discard=unmap",
    ]
    assert "nvme,drive=disk1,serial=berth1" in option_values(argv, "-device")
    assert option_values(argv, "-fw_cfg") == [f"name=opt/org.berth/config,file={ignition}"]
    assert option_values(argv, "-chardev") == [
        f"file,id=console,path={tmp_path}/vm/serial.log,append=on"
    ]

    credentials = dict(decode_credential(v) for v in option_values(argv, "-smbios"))
    harness_key = (tmp_path / "vm" / "id_ed25519.pub").read_text().strip()
    assert harness_key.startswith("ssh-ed25519 ")
    assert credentials == {
        "ssh.authorized_keys.root": (
            f"{harness_key}\nssh-ed25519 AAAAdeveloper dev@laptop\n".encode()
        ),
        "berth.test": b"hello world",
    }


def test_interactive_console_shares_the_terminal_and_still_logs(
    tmp_path: Path, blank: Path
) -> None:
    argv = prepared_vm(tmp_path, blank, interactive=True).command()
    assert option_values(argv, "-chardev") == [
        f"stdio,id=console,mux=on,signal=off,logfile={tmp_path}/vm/serial.log,logappend=on"
    ]
    assert option_values(argv, "-mon") == ["chardev=console,mode=readline"]


def test_sata_adds_one_controller(tmp_path: Path, blank: Path) -> None:
    extra = blank_disk(tmp_path / "extra.qcow2")
    argv = prepared_vm(tmp_path, blank, disk_bus=DiskBus.SATA, extra_disks=(extra,)).command()
    devices = option_values(argv, "-device")
    assert devices.count("ahci,id=ahci") == 1
    assert "ide-hd,drive=disk1,bus=ahci.1,serial=berth1" in devices


def test_kvm_uses_the_host_cpu(tmp_path: Path, blank: Path) -> None:
    argv = prepared_vm(tmp_path, blank, accel=Accel.KVM).command()
    assert option_values(argv, "-accel") == ["kvm"]
    assert option_values(argv, "-cpu") == ["host"]


def test_overlay_keeps_the_image_pristine_and_can_grow(tmp_path: Path, blank: Path) -> None:
    before = blank.read_bytes()
    vm = prepared_vm(tmp_path, blank, disk_size="256M")
    overlay = image_info(tmp_path / "vm" / "overlay.qcow2")
    assert overlay["virtual-size"] == 256 * 2**20
    assert overlay["backing-filename"] == str(blank.resolve())
    assert overlay["backing-filename-format"] == "qcow2"
    assert blank.read_bytes() == before
    assert f"file={tmp_path}/vm/overlay.qcow2" in " ".join(vm.command())


def test_overlay_of_a_raw_image_names_its_format(tmp_path: Path) -> None:
    raw = blank_disk(tmp_path / "disk.raw", fmt="raw")
    prepared_vm(tmp_path, raw)
    assert image_info(tmp_path / "vm" / "overlay.qcow2")["backing-filename-format"] == "raw"


def test_overlay_cannot_shrink_the_image(tmp_path: Path, blank: Path) -> None:
    with pytest.raises(VMError, match="smaller than the image"):
        prepared_vm(tmp_path, blank, disk_size="16M")


def test_without_snapshot_the_image_itself_is_booted_and_resized(
    tmp_path: Path, blank: Path
) -> None:
    vm = prepared_vm(tmp_path, blank, snapshot=False, disk_size="128M")
    assert not (tmp_path / "vm" / "overlay.qcow2").exists()
    assert image_info(blank)["virtual-size"] == 128 * 2**20
    assert f"file={blank},discard=unmap" in " ".join(vm.command())


def test_given_ssh_key_needs_its_public_half(tmp_path: Path, blank: Path) -> None:
    with pytest.raises(VMError, match="public key"):
        prepared_vm(tmp_path, blank, ssh_key=tmp_path / "nokey")


def test_missing_disk_is_reported(tmp_path: Path) -> None:
    with pytest.raises(VMError, match="not found"):
        prepared_vm(tmp_path, tmp_path / "missing.qcow2")


def test_free_port_can_be_bound() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_ssh_config_and_command(tmp_path: Path) -> None:
    config = write_ssh_config(tmp_path / "ssh_config", port=2222, identity=tmp_path / "key")
    text = config.read_text()
    assert "  Port 2222\n" in text
    assert f"  IdentityFile {tmp_path}/key\n" in text
    assert "  StrictHostKeyChecking no\n" in text
    argv = ssh_argv(config, 2222, "true", connect_timeout=5)
    assert argv[1:] == [
        "-F",
        str(config),
        "-p",
        "2222",
        "-o",
        "ConnectTimeout=5",
        "root@127.0.0.1",
        "true",
    ]


def test_resolve_disk_prefers_qcow2_then_raw(tmp_path: Path) -> None:
    latest = tmp_path / "out" / "containerhost" / "latest"
    latest.mkdir(parents=True)
    (latest / "disk.raw").write_bytes(b"")
    assert resolve_disk("containerhost", tmp_path) == latest / "disk.raw"
    (latest / "disk.qcow2").write_bytes(b"")
    assert resolve_disk("containerhost", tmp_path) == latest / "disk.qcow2"


def test_resolve_disk_takes_an_existing_file_as_is(tmp_path: Path, blank: Path) -> None:
    assert resolve_disk(str(blank), tmp_path / "elsewhere") == blank


def test_resolve_disk_unknown_image(tmp_path: Path) -> None:
    with pytest.raises(VMError, match="no disk image for 'nosuch'") as err:
        resolve_disk("nosuch", tmp_path)
    assert err.value.hint is not None
    with pytest.raises(VMError, match="not found"):
        resolve_disk("some/dir/disk.qcow2", tmp_path)


def test_cli_reports_a_missing_image(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "/nonexistent/disk.qcow2"]) == 1
    assert "disk image not found" in capsys.readouterr().err


def test_strip_ansi_keeps_text_and_line_structure() -> None:
    raw = (
        b"\x1b[01;01H\x1b[=3h\x1b[0;32m  OK  \x1b[0m] Reached\r\n"
        b"[\x1b[0;1;38:5:185mDEPEND\x1b[0m] Dependency failed\r\r\nCount 5\rCount 4"
    )
    assert strip_ansi(raw) == ("  OK  ] Reached\n[DEPEND] Dependency failed\nCount 5\nCount 4")


def test_testinfra_host_uses_the_vm_ssh_config(tmp_path: Path, blank: Path) -> None:
    vm = prepared_vm(tmp_path, blank)
    backend = vm.testinfra_host().backend
    cmd, cmd_args = backend._build_ssh_command("true")
    line = " ".join(cmd) % tuple(cmd_args)
    assert f"-F {vm.ssh_config}" in line
    assert f"-o Port={vm.ssh_port}" in line
    assert line.endswith("127.0.0.1 true")
    # A multiplexing master from before a reboot would hang later commands.
    assert "ControlMaster" not in line


# stderr of QEMU on a host whose /dev/kvm starts a vCPU and stops it in OVMF's first
# instructions (seen on a CI-like machine): the old probe, which never ran the vCPU, said yes.
KVM_EMULATION_FAILURE = b"KVM internal error. Suberror: 1\nextra data[0]: 0x1\nemulation failure\n"


@pytest.mark.parametrize(
    ("console", "errors", "usable"),
    [
        (b"\x1b[2J\x1b[01;01HBdsDxe: loading Boot0001", b"", True),
        (b"", KVM_EMULATION_FAILURE, False),
        (b"BdsDxe", KVM_EMULATION_FAILURE, False),
        # Silent for the whole probe: too slow for KVM, or aborted before the firmware ran.
        (b"", b"", False),
        (b"\r\n", b"qemu-system-x86_64: error: failed to set MSR 0x38f\n", False),
    ],
)
def test_kvm_counts_as_usable_only_when_the_firmware_ran_and_printed(
    console: bytes, errors: bytes, usable: bool
) -> None:
    assert kvm_probe_passed(console, errors) is usable


def test_secure_boot_firmware_runs_with_smm_and_a_secure_variable_store(
    tmp_path: Path, blank: Path
) -> None:
    vm = prepared_vm(tmp_path, blank, firmware=Firmware.SECURE_BOOT)
    argv = vm.command()
    assert option_values(argv, "-machine") == ["q35,smm=on"]
    assert option_values(argv, "-global") == ["driver=cfi.pflash01,property=secure,value=on"]
    pflash = option_values(argv, "-drive")[:2]
    assert pflash[0].endswith("readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
    # OVMF's empty store: setup mode, where systemd-boot enrols the ESP's keys.
    assert (tmp_path / "vm" / "OVMF_VARS.fd").read_bytes() == OVMF_VARS.read_bytes()
    plain = prepared_vm(tmp_path / "plain", blank).command()
    assert "-global" not in plain


def test_enrolled_variables_hold_the_keys_directory_certificates(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from builder.publish import secureboot
    from qemu.secureboot import enrolled_vars

    keys = tmp_path / "keys"
    secureboot.init_secureboot_keys(keys)
    store = enrolled_vars(keys / "secureboot", tmp_path / "vars.fd")
    assert store.stat().st_size == OVMF_VARS.stat().st_size
    printed = run(
        [sys.executable, "-m", "virt.firmware.vars", "-i", store, "-p"], quiet=True
    ).stdout.decode()
    names = {line.split(":")[0].strip() for line in printed.splitlines() if ":" in line}
    assert {"PK", "KEK", "db", "SecureBootEnable"} <= names
    data = store.read_bytes()
    owner = secureboot.read_guid(keys)
    for name in ("PK", "KEK", "db"):
        der = secureboot.load_certificate(keys / f"secureboot/{name}.crt").public_bytes(
            serialization.Encoding.DER
        )
        assert owner.bytes_le + der in data, name  # each list entry: owner GUID, then the cert


def test_keys_can_be_enrolled_with_secure_boot_switched_off(tmp_path: Path) -> None:
    from builder.publish import secureboot
    from qemu.secureboot import enrolled_vars

    secureboot.init_secureboot_keys(tmp_path / "keys")
    store = enrolled_vars(tmp_path / "keys/secureboot", tmp_path / "off.fd", enforce=False)
    printed = run(
        [sys.executable, "-m", "virt.firmware.vars", "-i", store, "-p"], quiet=True
    ).stdout.decode()
    enable = [line for line in printed.splitlines() if line.startswith("SecureBootEnable")]
    assert enable and enable[0].split()[-1] == "off", printed
    assert any(line.startswith("PK ") for line in printed.splitlines())


def test_enrolling_without_the_certificates_names_the_missing_one(tmp_path: Path) -> None:
    from qemu.secureboot import enrolled_vars

    (tmp_path / "secureboot").mkdir()
    with pytest.raises(VMError, match=r"secureboot/PK\.crt: enrolling Secure Boot keys needs"):
        enrolled_vars(tmp_path / "secureboot", tmp_path / "vars.fd")


def test_run_without_an_image_boots_the_default_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import qemu.__main__ as cli

    seen: list[tuple[Path, Firmware]] = []

    def fake_run_vm(args: object, interactive: bool) -> int:
        config_disk = cli.resolve_disk(args.image, tmp_path)  # type: ignore[attr-defined]
        seen.append((config_disk, Firmware.SECURE_BOOT if args.secure_boot else Firmware.UEFI))  # type: ignore[attr-defined]
        return 0

    latest = tmp_path / "out/containerhost/latest"
    latest.mkdir(parents=True)
    blank_disk(latest / "disk.qcow2")
    monkeypatch.setattr(cli, "run_vm", fake_run_vm)
    assert main(["run", "--secure-boot"]) == 0
    assert seen == [(latest / "disk.qcow2", Firmware.SECURE_BOOT)]
