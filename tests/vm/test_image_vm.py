"""The default image booted under QEMU: one boot and one reboot check the first-boot story.

Boots cost one to two minutes under TCG, so each boot checks many things.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from builder.image import BuildResult
from builder.run import run
from qemu import DiskBus
from qemu.secureboot import enrolled_vars
from tests.support import REPO
from tests.support.oci import oci_archive, static_hello
from tests.support.vms import boot
from updater.disk import gpt

DISK_SIZE = "8G"


def _findmnt(vm: Any, path: str) -> dict[str, str]:
    out = vm.ssh_output(f"findmnt --json --output SOURCE,FSTYPE,OPTIONS,SIZE {path}")
    fs: dict[str, str] = json.loads(out)["filesystems"][0]
    return fs


def test_first_boot_reboot_and_containers(
    built_image: BuildResult, artifacts: Path, vm_factory: list[Any], tmp_path: Path
) -> None:
    image = built_image.output
    vm = boot(image / "disk.qcow2", artifacts / "vm", disk_size=DISK_SIZE)
    vm_factory.append(vm)
    vm.start()
    vm.wait_for_ssh(timeout=600)
    host = vm.testinfra_host()

    # The version this image was built as, in os-release.
    release = host.file("/etc/os-release").content_string
    assert f'VERSION_ID="{built_image.version}"' in release
    assert f'IMAGE_VERSION="{built_image.version}"' in release

    # / is read-only erofs on a verified dm-verity device whose hash is the UKI's.
    root = _findmnt(vm, "/")
    assert root["source"] == "/dev/mapper/root"
    assert root["fstype"] == "erofs"
    assert "ro" in root["options"].split(",")
    status = vm.ssh_output("veritysetup status root")
    assert "status:      verified" in status
    assert built_image.roothash in status
    assert built_image.roothash in host.file("/proc/cmdline").content_string
    assert vm.ssh("touch /usr/berth-write-test", check=False).returncode != 0

    # /var is STATE, grown on first boot from the image's 512 MiB to (nearly) the whole disk.
    var = _findmnt(vm, "/var")
    assert Path(vm.ssh_output("readlink -f /dev/disk/by-partlabel/STATE")).name == "vda6"
    assert var["fstype"] == "ext4"
    var_bytes = int(vm.ssh_output("findmnt -bno SIZE /var"))
    assert var_bytes > 2 * 1024**3, f"STATE was not grown: {var_bytes} bytes"

    # /etc is an overlay with its upper layer on STATE; /root and /home live on STATE too.
    etc = _findmnt(vm, "/etc")
    assert etc["fstype"] == "overlay"
    assert "upperdir=/sysroot/var/lib/berth/etc/upper" in etc["options"]
    for path in ("/root", "/home"):
        assert "vda6" in _findmnt(vm, path)["source"]
    assert _findmnt(vm, "/tmp")["fstype"] == "tmpfs"

    # The system came up cleanly and reached boot-complete.target.
    state = vm.ssh("systemctl is-system-running --wait", check=False, timeout=300)
    failed = vm.ssh_output("systemctl --failed --no-legend")
    assert state.stdout.decode().strip() == "running", failed
    assert host.service("boot-complete.target").is_running
    assert host.service("ssh").is_running
    assert host.service("systemd-networkd").is_running

    # Keys only: sshd refuses passwords and no account has one.
    sshd = vm.ssh_output("sshd -T")
    assert "passwordauthentication no" in sshd
    assert "kbdinteractiveauthentication no" in sshd
    shadow = vm.ssh_output("cut -d: -f2 /etc/shadow | sort -u").split()
    assert all(field.startswith(("!", "*")) for field in shadow), shadow
    # The image's account files already hold what its sysusers.d files declare: the boot's
    # systemd-sysusers wrote nothing, so /etc/passwd still follows the image.
    assert vm.ssh_output("systemctl show -P Result systemd-sysusers.service") == "success"
    upper = "/var/lib/berth/etc/upper"
    assert vm.ssh_output(f"ls {upper}/passwd {upper}/group {upper}/shadow 2>/dev/null; true") == ""
    assert (
        vm.ssh_output("getent passwd core") == "core:x:1000:1000:Berth admin:/home/core:/bin/bash"
    )
    (artifacts / "blame.txt").write_text(vm.ssh_output("systemd-analyze blame"))

    # No package manager to upgrade in place; the package list ships in the image.
    assert vm.ssh("command -v apt-get || command -v dpkg", check=False).returncode != 0
    assert "podman\t" in host.file("/usr/share/berth/packages.txt").content_string

    # The update agent's runtime is there: its package, python-tuf and its crypto, the trust
    # anchor of the keys this image was built with, and the image's update defaults.
    vm.ssh(
        "python3 -c 'import tuf.ngclient, securesystemslib.signer, cryptography, requests,"
        " updater.disk.gpt, updater.release.manifest'"
    )
    status = json.loads(vm.ssh_output("berth-update status --json"))
    assert str(built_image.version) in json.dumps(status), status
    # No TPM here: the image's encrypt = "auto" left STATE plain ext4, mounted as ever, and
    # status says why (tests/vm/test_encryption_vm.py has the machine with one).
    assert (status["state_encrypted"], status["tpm"]) == (False, "none"), status
    assert status["state_encryption"] == "not encrypted (no TPM 2.0 at first boot)"
    assert Path(vm.ssh_output("readlink -f /dev/disk/berth-state")).name == "vda6"
    anchor = (REPO / "keys" / "root.json").read_text()
    assert host.file("/usr/share/berth/tuf/root.json").content_string == anchor
    assert "[update]" in host.file("/usr/lib/berth/update.toml").content_string
    # The health check gated boot-complete.target and passed; the daemon runs, has judged the
    # boot, and idles without a repository (the test image has none) instead of failing.
    health = host.service("berth-health.service")
    assert health.is_enabled and health.is_running  # oneshot with RemainAfterExit
    assert "health check passed" in vm.ssh_output("journalctl -b -u berth-health.service")
    daemon = host.service("berth-update.service")
    assert daemon.is_enabled and daemon.is_running
    assert "idle" in vm.ssh_output("systemctl show -P StatusText berth-update.service")
    assert "no update repository configured" in vm.ssh_output(
        "journalctl -b -u berth-update.service"
    )

    machine_id = host.file("/etc/machine-id").content_string.strip()
    assert len(machine_id) == 32
    assert host.file(f"/var/log/journal/{machine_id}").is_directory

    # podman runs a container from an OCI archive made here (no registry is reachable).
    archive = oci_archive(
        {"hello": (static_hello(tmp_path), 0o755)}, ["/hello", "from", "berth"], "berth/hello:1"
    )
    vm.ssh("cat > /var/tmp/hello.tar", input=archive)
    vm.ssh("podman load -q -i /var/tmp/hello.tar", timeout=300)
    out = vm.ssh_output("podman run --rm localhost/berth/hello:1")
    assert out == "berth-container-ok from berth"

    # What an operator writes persists across a reboot: /etc, /root, the machine-id, the keys.
    vm.ssh("echo persisted > /etc/berth-test.conf && echo note > /root/note")
    boot_id = vm.boot_id()
    vm.reboot_and_wait(timeout=600)
    assert vm.boot_id() != boot_id
    assert vm.ssh_output("cat /etc/berth-test.conf") == "persisted"
    assert vm.ssh_output("cat /root/note") == "note"
    assert vm.ssh_output("cat /etc/machine-id") == machine_id
    boots = re.findall(r"\b[0-9a-f]{32}\b", vm.ssh_output("journalctl --list-boots"))
    assert len(boots) >= 2, "the journal is not persistent across reboots"
    vm.shutdown()


def test_tampered_root_never_runs(
    built_image: BuildResult, artifacts: Path, vm_factory: list[Any], tmp_path: Path
) -> None:
    """Bytes changed in root-A's data: the machine must stop or reboot, never reach a login."""
    disk = tmp_path / "tampered.raw"
    run(["cp", "--sparse=always", built_image.output / "disk.raw", disk])
    with disk.open("r+b") as f:
        table = gpt.read_table(f)
        root_a = table.partitions[1]
        start = root_a.offset_bytes()
        # The erofs superblock (read at mount) and blocks spread over the data: whatever the
        # boot reads first, it reads changed bytes.
        for offset in [1024 + 8, *range(1 << 20, 64 << 20, 4 << 20)]:
            f.seek(start + offset)
            byte = f.read(1)
            f.seek(start + offset)
            f.write(bytes([byte[0] ^ 0xFF]))
    # On NVMe, so the same boot also proves the initrd drives NVMe disks (as on most clouds): the
    # corruption is only found once the root partition is read through that driver.
    # With the keys enrolled beforehand: from setup mode, systemd-boot's reset after enrolling
    # them would end QEMU (-no-reboot) before the kernel ran. So this boot is enforced as well.
    store = enrolled_vars(REPO / "keys/secureboot", tmp_path / "enrolled.fd")
    vm = boot(
        disk,
        artifacts / "vm",
        snapshot=False,
        no_reboot=True,
        disk_bus=DiskBus.NVME,
        ovmf_vars=store,
    )
    vm_factory.append(vm)
    vm.start()
    # restart-on-corruption reboots; -no-reboot turns that into QEMU exiting.
    vm.wait_exit(timeout=600)
    log = vm.serial_text()
    assert "nvme0n1" in log, vm.serial_tail()
    assert "verity" in log and "corrupted" in log, vm.serial_tail()
    assert "Secure boot enabled" in log
    assert "Reached target multi-user.target" not in log
    assert "Started ssh.service" not in log
    assert "login:" not in log


def test_the_built_images_sbom_is_valid_and_complete(built_image: BuildResult) -> None:
    """No boot: the SPDX project's validator reads the SBOM the session's build wrote."""
    from spdx_tools.spdx.parser.parse_anything import parse_file
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

    sbom = built_image.output / "sbom.spdx.json"
    document = parse_file(str(sbom))
    assert [m.validation_message for m in validate_full_spdx_document(document)] == []
    listed = {
        line.split("\t")[0]
        for line in (built_image.output / "packages.txt").read_text().splitlines()
    }
    names = {package.name for package in document.packages}
    assert listed <= names and "berth-update" in names and "berth-containerhost" in names
