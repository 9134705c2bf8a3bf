"""Machines under QEMU for tests: the session's one built image, VMs that are stopped when their
test ends (their serial logs kept in test-artifacts/ for a failed test), and, for the harness's
own tests, blank disks and VMs prepared but never started.

A build and a boot cost minutes, so every VM test that can boots the same image
(`built_image`, built once per session) and checks many things per boot.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builder.config import load_image
from builder.image import BuildResult, build_image
from builder.run import find_tool, run
from qemu import VM, Accel, VMConfig
from tests.support import REPO

ARTIFACTS = REPO / "test-artifacts"

# One version for the test image: fixed, so a second session reuses nothing stale by accident
# (the build always rebuilds the output; only the package cache is shared).
TEST_VERSION = os.environ.get("BERTH_TEST_VERSION", "1.0.0")


@pytest.fixture(scope="session")
def built_image() -> BuildResult:
    """The default image (containerhost), built once per test session."""
    from updater.release.version import Version

    config = load_image("containerhost", REPO / "images")
    # BERTH_TEST_OUT: another output directory, so that two test sessions at once do not
    # replace the disk images each other's VMs are booted from.
    out = Path(os.environ["BERTH_TEST_OUT"]) if os.environ.get("BERTH_TEST_OUT") else None
    return build_image(config, Version.parse(TEST_VERSION), REPO, out_dir=out)


@pytest.fixture
def artifacts(request: pytest.FixtureRequest) -> Path:
    """Where a test keeps serial logs and journals; kept after the run for failed tests."""
    path: Path = ARTIFACTS / str(request.node.name).replace("/", "_")
    path.mkdir(parents=True, exist_ok=True)
    return path


def boot(disk: Path, workdir: Path, **options: object) -> VM:
    config = VMConfig(
        disk=disk,
        work_dir=workdir,
        serial_log=workdir / "serial.log",
        **options,  # type: ignore[arg-type]
    )
    return VM(config)


@pytest.fixture
def vm_factory(artifacts: Path) -> Iterator[list[VM]]:
    """Tests append the VMs they start; all are stopped even when the test fails."""
    vms: list[VM] = []
    yield vms
    for vm in vms:
        vm.close()


def blank_disk(path: Path, size: str = "64M", fmt: str = "qcow2") -> Path:
    """An empty disk image: the firmware finds nothing to boot on it."""
    run(["qemu-img", "create", "-q", "-f", fmt, path, size], quiet=True)
    return path


@pytest.fixture
def blank(tmp_path: Path) -> Path:
    return blank_disk(tmp_path / "blank.qcow2")


def prepared_vm(tmp_path: Path, disk: Path, **kwargs: Any) -> VM:
    """A VM with its overlay, NVRAM and keys in place and its command line built, not started."""
    # TCG unless a test asks otherwise: no KVM probe, and the same argv on every host.
    config = VMConfig(disk=disk, work_dir=tmp_path / "vm", accel=Accel.TCG)
    vm = VM(dataclasses.replace(config, **kwargs))
    vm.prepare()
    return vm


def option_values(argv: list[str], option: str) -> list[str]:
    """The values given to `option` in a command line, in order."""
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == option]


def login_as(vm: VM, user: str, key: Path, command: str, timeout: float = 60) -> str:
    """Run `command` as `user` with `key`: proves the config's key and account work for SSH."""
    argv = [
        find_tool("ssh"),
        *("-F", str(vm.ssh_config), "-i", str(key), "-l", user, "-p", str(vm.ssh_port)),
        "127.0.0.1",
        command,
    ]
    result = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout.decode().strip()
