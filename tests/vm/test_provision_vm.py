"""First-boot provisioning on booted machines: Ignition over fw_cfg, cloud-config on a NoCloud
drive, user-data from an EC2-style metadata service, and a malformed config that stops the boot.

Each machine boots the session's image once (the Ignition one twice, to show that a second boot
applies nothing); every boot checks as much as it can. Remote file contents come from nginx on
the host's loopback, which the guest reaches at 10.0.2.2 through QEMU's user network.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

from builder.image import BuildResult
from qemu import VM
from qemu.drives import make_cidata
from qemu.ssh import generate_key
from tests.support.misbehaving_server import TOKEN, MetadataServer
from tests.support.oci import oci_archive, static_hello
from tests.support.servers import NginxServer
from tests.support.vms import boot, login_as

GUEST_HOST = "10.0.2.2"

TEST_UNIT = """[Unit]
Description=A unit the first-boot config installs and enables

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'echo started on boot %b >> /var/lib/e2e/unit.log'

[Install]
WantedBy=multi-user.target
"""


def stamp(vm: VM) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(vm.ssh_output("cat /var/lib/berth/provisioned"))
    return doc


def test_ignition_over_fw_cfg_applies_once(
    built_image: BuildResult, artifacts: Path, vm_factory: list[VM], tmp_path: Path
) -> None:
    alice = generate_key(tmp_path / "alice").read_text().strip()
    served = tmp_path / "www"
    served.mkdir()
    remote = b"fetched over http and checked against its sha512\n"
    (served / "remote.txt").write_bytes(remote)
    with NginxServer(served, tmp_path / "nginx") as web:
        config = {
            "ignition": {"version": "3.4.0"},
            "passwd": {
                # The groups Fedora CoreOS's examples use: they exist on Berth too.
                "users": [
                    {"name": "alice", "sshAuthorizedKeys": [alice], "groups": ["wheel", "docker"]}
                ]
            },
            "storage": {
                "directories": [{"path": "/var/lib/e2e", "mode": 0o750}],
                "files": [
                    {
                        "path": "/etc/hostname",
                        "overwrite": True,
                        "contents": {"source": "data:,ign-node%0A"},
                    },
                    {
                        "path": "/etc/e2e/hello.txt",
                        "mode": 0o600,
                        "contents": {"source": "data:;base64,aGVsbG8K"},
                    },
                    {
                        "path": "/var/lib/e2e/remote.txt",
                        "contents": {
                            "source": f"http://{GUEST_HOST}:{web.port}/remote.txt",
                            "verification": {
                                "hash": "sha512-" + hashlib.sha512(remote).hexdigest()
                            },
                        },
                    },
                ],
                "links": [{"path": "/etc/e2e/link", "target": "/etc/e2e/hello.txt"}],
            },
            "systemd": {
                "units": [
                    {"name": "e2e-first.service", "enabled": True, "contents": TEST_UNIT},
                    {"name": "systemd-timesyncd.service", "mask": True},
                ]
            },
        }
        ignition = tmp_path / "config.ign"
        ignition.write_text(json.dumps(config))
        vm = boot(
            built_image.output / "disk.qcow2",
            artifacts / "vm",
            fw_cfg=(("opt/org.berth/config", ignition),),
        )
        vm_factory.append(vm)
        vm.start()
        vm.wait_for_ssh(timeout=900)
        assert "berth-provision: applied:" in vm.serial_text()

        groups = login_as(vm, "alice", tmp_path / "alice", "id -nG").split()
        assert sorted(groups) == ["alice", "docker", "wheel"]
        # alice got subordinate ids beside core's (the image's), so rootless podman works for
        # her: a container from an archive made here runs as her, in her own storage.
        subuid = vm.ssh_output("cat /etc/subuid")
        assert subuid == vm.ssh_output("cat /etc/subgid")
        assert subuid.splitlines() == ["core:100000:65536", "alice:165536:65536"]
        archive = oci_archive(
            {"hello": (static_hello(tmp_path), 0o755)}, ["/hello", "rootless"], "berth/hello:1"
        )
        vm.ssh("cat > /var/tmp/hello.tar && chmod 644 /var/tmp/hello.tar", input=archive)
        rootless = login_as(
            vm,
            "alice",
            tmp_path / "alice",
            "podman load -q -i /var/tmp/hello.tar >/dev/null && podman run --rm "
            "localhost/berth/hello:1 && podman info --format '{{.Host.Security.Rootless}}'",
            timeout=600,
        )
        assert rootless == "berth-container-ok rootless\ntrue"
        assert vm.ssh("test -d /home/alice/.local/share/containers/storage").returncode == 0
        assert vm.ssh_output("podman images -q localhost/berth/hello:1") == ""  # not root's
        assert vm.ssh_output("hostname") == "ign-node"
        assert vm.ssh_output("cat /etc/e2e/hello.txt") == "hello"
        assert vm.ssh_output("stat -c %a /etc/e2e/hello.txt /var/lib/e2e") == "600\n750"
        assert vm.ssh_output("cat /var/lib/e2e/remote.txt") == remote.decode().strip()
        assert vm.ssh_output("readlink /etc/e2e/link") == "/etc/e2e/hello.txt"
        assert vm.ssh_output("systemctl is-enabled e2e-first.service") == "enabled"
        vm.ssh("systemctl is-active --wait e2e-first.service", timeout=120)
        masked = vm.ssh("systemctl is-enabled systemd-timesyncd.service", check=False)
        assert masked.stdout.decode().strip() == "masked"  # (is-enabled exits 1 for masked)
        first = stamp(vm)
        assert first["result"] == "applied" and first["format"] == "ignition"
        assert "fw_cfg opt/org.berth/config" in first["source"]
        assert [(r.status, r.path) for r in web.requests()] == [(200, "/remote.txt")]

    # Second boot: the stamp on STATE skips provisioning; what the operator changed stays.
    vm.ssh("echo changed > /etc/e2e/hello.txt && sync")
    vm.reboot_and_wait(timeout=900)
    assert vm.ssh_output("cat /etc/e2e/hello.txt") == "changed"
    assert stamp(vm) == first
    assert vm.ssh_output("systemctl show -P ConditionResult berth-provision.service") == "no"
    assert vm.ssh_output("hostname") == "ign-node"
    assert login_as(vm, "alice", tmp_path / "alice", "whoami") == "alice"
    # The enabled unit started on both boots.
    assert len(vm.ssh_output("cat /var/lib/e2e/unit.log").splitlines()) == 2
    vm.shutdown()


def test_malformed_config_stops_the_boot_before_sshd(
    built_image: BuildResult, artifacts: Path, vm_factory: list[VM], tmp_path: Path
) -> None:
    ignition = tmp_path / "config.ign"
    ignition.write_text(
        json.dumps(
            {
                "ignition": {"version": "3.4.0"},
                "storage": {
                    "files": [{"path": "/etc/e2e/ok.txt", "contents": {"source": "data:,x"}}],
                    "disks": [{"device": "/dev/vdb", "wipeTable": True}],
                },
            }
        )
    )
    vm = boot(
        built_image.output / "disk.qcow2",
        artifacts / "vm",
        fw_cfg=(("opt/com.coreos/config", ignition),),
    )
    vm_factory.append(vm)
    vm.start()
    failed = vm.wait_for_serial(r"berth-provision: FAILED: [^\r\n]*", timeout=900)
    assert "storage.disks" in failed and "not supported" in failed
    vm.wait_for_serial(r"Dependency failed for [^\r\n]*(OpenBSD Secure Shell|ssh)", timeout=300)
    # sshd never started: the harness cannot log in.
    result = vm.ssh("true", check=False, timeout=30)
    assert result.returncode != 0


CLOUD_CONFIG = """#cloud-config
hostname: cc-node
users:
  - default
  - name: carol
    groups: [sudo]
    ssh_authorized_keys:
      - {carol}
write_files:
  - path: /etc/e2e/plain.txt
    content: |
      plain
  - path: /etc/e2e/encoded.txt
    encoding: gz+b64
    permissions: "0600"
    content: {encoded}
runcmd:
  - echo "runcmd as shell" >> /var/lib/e2e-runcmd.log
  - [sh, -c, "echo runcmd as argv >> /var/lib/e2e-runcmd.log"]
"""


def test_cloud_config_on_a_nocloud_drive(
    built_image: BuildResult, artifacts: Path, vm_factory: list[VM], tmp_path: Path
) -> None:
    carol = generate_key(tmp_path / "carol").read_text().strip()
    encoded = base64.b64encode(gzip.compress(b"unzipped\n", mtime=0)).decode()
    user_data = CLOUD_CONFIG.format(carol=carol, encoded=encoded).encode()
    drive = make_cidata(
        tmp_path / "cidata.img", user_data, "instance-id: iid-e2e\nlocal-hostname: meta-name\n"
    )
    vm = boot(built_image.output / "disk.qcow2", artifacts / "vm", extra_disks=(drive,))
    vm_factory.append(vm)
    vm.start()
    vm.wait_for_ssh(timeout=900)
    assert login_as(vm, "carol", tmp_path / "carol", "id -nG") == "carol sudo"
    # sudo grants root without a password, as on Flatcar and Fedora CoreOS (no account has one).
    assert login_as(vm, "carol", tmp_path / "carol", "sudo -n id -un") == "root"
    # The config's hostname wins over the drive's meta-data.
    assert vm.ssh_output("hostname") == "cc-node"
    assert vm.ssh_output("cat /etc/e2e/plain.txt /etc/e2e/encoded.txt") == "plain\nunzipped"
    assert vm.ssh_output("stat -c %a /etc/e2e/encoded.txt") == "600"
    assert vm.ssh_output("cat /var/lib/e2e-runcmd.log") == "runcmd as shell\nruncmd as argv"
    record = stamp(vm)
    assert record["format"] == "cloud-config" and "NoCloud" in record["source"]
    assert record["result"] == "applied"
    vm.shutdown()


def test_user_data_script_from_ec2_metadata(
    built_image: BuildResult, artifacts: Path, vm_factory: list[VM], tmp_path: Path
) -> None:
    pair = generate_key(tmp_path / "ec2-pair").read_text().strip()
    with MetadataServer() as imds:
        imds.user_data = b'#!/bin/sh\necho "script ran as $(id -un)" > /var/lib/e2e-script\n'
        imds.ec2_meta = {"instance-id": "i-0e2e", "local-hostname": "ip-10-1-2-3.ec2.internal"}
        imds.ec2_keys = {"e2e-pair": pair}
        port = int(imds.url.rsplit(":", 1)[1])
        vm = boot(
            built_image.output / "disk.qcow2",
            artifacts / "vm",
            smbios=("type=1,manufacturer=Amazon EC2,product=t3.micro",),
            user_network="169.254.169.0/24",
            guest_forwards=(("169.254.169.254", 80, port),),
        )
        vm_factory.append(vm)
        vm.start()
        vm.wait_for_ssh(timeout=900)
        assert vm.ssh_output("cat /var/lib/e2e-script") == "script ran as root"
        # The host name comes from the instance's metadata when the user-data names none.
        assert vm.ssh_output("hostname") == "ip-10-1-2-3"
        record = stamp(vm)
        assert record["platform"] == "ec2" and record["format"] == "script"
        assert "EC2 IMDSv2" in record["source"]
        # IMDSv2: a session token first, then every read carries it.
        assert imds.paths()[:2] == ["PUT /latest/api/token", "GET /latest/user-data"]
        gets = [s for s in imds.seen if s.method == "GET"]
        assert gets and all(s.headers.get("x-aws-ec2-metadata-token") == TOKEN for s in gets)
        assert "GET /latest/meta-data/public-keys/0/openssh-key" in imds.paths()
        assert record["keys"] == "1 for core from EC2 IMDSv2 public-keys"
    # The launch key pair logs in as core, the admin of Fedora CoreOS and Flatcar: in their
    # groups, root through sudo without a password, allowed to reach the Docker API.
    key = tmp_path / "ec2-pair"
    groups = login_as(vm, "core", key, "id -nG").split()
    assert {"core", "adm", "wheel", "sudo", "docker", "systemd-journal"} <= set(groups), groups
    assert login_as(vm, "core", key, "sudo -n id -un") == "root"
    assert login_as(vm, "core", key, "stat -c %a:%U $HOME $HOME/.ssh/authorized_keys") == (
        "700:core\n600:core"
    )
    ping = "curl -sS --unix-socket /run/docker.sock http://docker/_ping"
    assert login_as(vm, "core", key, ping) == "OK"
    vm.shutdown()
