"""Containers on Berth under QEMU: one containerhost boot (podman, quadlet, the Docker API,
preloaded images) and one boot of the Docker Engine variant.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from builder.config import load_image
from builder.image import BuildResult, build_image
from tests.support import REPO
from tests.support.containers import (
    IMAGE,
    httpd_archive,
    install_web_service,
    web_answers,
    web_starts,
)
from tests.support.oci import oci_archive, static_hello
from tests.support.vms import TEST_VERSION, boot
from updater.release.version import Version

DISK_SIZE = "8G"
COMPOSE = """\
services:
  hello:
    image: localhost/berth/hello:1
    command: ["/hello", "from", "compose"]
"""


@pytest.fixture(scope="module")
def preload_image(tmp_path_factory: pytest.TempPathFactory) -> BuildResult:
    """containerhost with the test web server's image preloaded, in a directory of its own."""
    work = tmp_path_factory.mktemp("preload")
    archive = work / "httpd.tar"
    archive.write_bytes(httpd_archive(work))
    config = load_image("containerhost", REPO / "images")
    config = dataclasses.replace(config, preload=(archive,))
    return build_image(config, Version.parse(TEST_VERSION), REPO, out_dir=work / "out")


def test_container_host(
    preload_image: BuildResult, artifacts: Path, vm_factory: list[Any], tmp_path: Path
) -> None:
    vm = boot(preload_image.output / "disk.qcow2", artifacts / "vm", disk_size=DISK_SIZE)
    vm_factory.append(vm)
    vm.start()
    vm.wait_for_ssh(timeout=600)

    # podman's runtime: cgroup v2, overlay storage on STATE, crun, netavark, pasta, journald.
    assert vm.ssh_output("stat -fc %T /sys/fs/cgroup") == "cgroup2fs"
    info = json.loads(vm.ssh_output("podman info --format json", timeout=300))
    assert info["host"]["cgroupVersion"] == "v2"
    assert info["host"]["ociRuntime"]["name"] == "crun"
    assert info["host"]["networkBackend"] == "netavark"
    assert info["host"]["logDriver"] == "journald"
    assert info["host"]["pasta"]["executable"], info["host"]["pasta"]
    assert info["store"]["graphDriverName"] == "overlay"
    assert info["store"]["graphRoot"] == "/var/lib/containers/storage"
    state = vm.ssh_output("findmnt -no SOURCE -T /var/lib/containers/storage")
    assert "vda6" in vm.ssh_output(f"readlink -f {state}")
    assert vm.ssh_output("sysctl -n fs.inotify.max_user_instances") == "8192"

    # Preloaded at build time, in the read-only store inside the verity root: nothing was loaded
    # or pulled on this machine.
    images = json.loads(vm.ssh_output("podman images --format json"))
    preloaded = [i for i in images if IMAGE in (i.get("Names") or [])]
    assert preloaded and preloaded[0]["ReadOnly"] is True, images
    assert vm.ssh_output("findmnt -no FSTYPE -T /usr/lib/containers/storage") == "erofs"

    # A quadlet service from that image, with a named volume, answers on its port.
    install_web_service(vm, "hello from a quadlet\n")
    assert web_answers(vm) == "hello from a quadlet\n"
    assert vm.ssh_output("systemctl show -P Restart web.service") == "always"
    log_type = vm.ssh_output("podman inspect --format '{{.HostConfig.LogConfig.Type}}' web")
    assert log_type == "journald"

    # The Docker API on /run/docker.sock is podman's, and sees the quadlet's container.
    sock = "curl -sf --unix-socket /run/docker.sock"
    assert vm.ssh_output(f"{sock} http://d/_ping") == "OK"
    version = json.loads(vm.ssh_output(f"{sock} http://d/version"))
    assert any(c["Name"] == "Podman Engine" for c in version["Components"]), version
    containers = json.loads(vm.ssh_output(f"{sock} http://d/containers/json"))
    assert any("/web" in c["Names"] for c in containers), containers

    # The docker command and compose files, on an image loaded from an archive.
    hello = oci_archive(
        {"hello": (static_hello(tmp_path), 0o755)}, ["/hello", "from", "docker"], "berth/hello:1"
    )
    vm.ssh("cat > /var/tmp/hello.tar", input=hello)
    vm.ssh("docker load -i /var/tmp/hello.tar", timeout=300)
    assert (
        vm.ssh_output("docker run --rm localhost/berth/hello:1") == "berth-container-ok from docker"
    )
    vm.ssh("mkdir -p /root/compose && cat > /root/compose/compose.yaml", input=COMPOSE.encode())
    compose = vm.ssh_output("cd /root/compose && docker compose run --rm hello", timeout=300)
    assert "berth-container-ok from compose" in compose

    # The restart policy: a container that dies is started again, with its volume.
    assert web_starts(vm) == 1
    vm.ssh("podman kill web")
    assert web_answers(vm) == "hello from a quadlet\n"
    assert web_starts(vm) == 2

    # Quadlet services start at boot, with the volume's data.
    vm.reboot_and_wait(timeout=600)
    assert web_answers(vm) == "hello from a quadlet\n"
    assert web_starts(vm) == 3
    vm.shutdown()


def test_docker_engine_variant(artifacts: Path, vm_factory: list[Any], tmp_path: Path) -> None:
    config = load_image("docker", REPO / "images")
    built = build_image(config, Version.parse(TEST_VERSION), REPO, out_dir=tmp_path / "out")
    vm = boot(built.output / "disk.qcow2", artifacts / "vm", disk_size=DISK_SIZE)
    vm_factory.append(vm)
    vm.start()
    vm.wait_for_ssh(timeout=600)

    info = json.loads(vm.ssh_output("docker info --format json", timeout=300))
    assert info["CgroupVersion"] == "2"
    assert info["Driver"] == "overlay2"
    assert info["LoggingDriver"] == "journald"
    assert info["DockerRootDir"] == "/var/lib/docker"
    assert (
        vm.ssh("systemctl is-active containerd.service docker.service", check=False).returncode == 0
    )
    assert vm.ssh("command -v podman", check=False).returncode != 0

    hello = oci_archive(
        {"hello": (static_hello(tmp_path), 0o755)},
        ["/hello", "from", "dockerd"],
        "berth/hello:1",
        docker=True,
    )
    vm.ssh("cat > /var/tmp/hello.tar", input=hello)
    vm.ssh("docker load -i /var/tmp/hello.tar", timeout=300)
    out = vm.ssh_output("docker run --rm berth/hello:1")
    assert out == "berth-container-ok from dockerd"
    vm.shutdown()
