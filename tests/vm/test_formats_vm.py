"""The VMware disk boots: the session's image converted to a stream-optimized VMDK, booted once.

The other formats are checked by their readers in test_formats.py; one boot proves that what
qemu-img wrote into the VMDK (compressed grains, the GPT at both ends) is a bootable Berth disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from builder import formats
from builder.image import BuildResult
from tests.support.vms import boot


def test_vmdk_boots_to_ssh(
    built_image: BuildResult, artifacts: Path, vm_factory: list[Any], tmp_path: Path
) -> None:
    vmdk = tmp_path / "disk.vmdk"
    formats.make_vmdk(built_image.output / "disk.raw", vmdk)
    assert formats.image_info(vmdk)["format-specific"]["data"]["create-type"] == "streamOptimized"

    vm = boot(vmdk, artifacts / "vm")
    vm_factory.append(vm)
    vm.start()
    vm.wait_for_ssh(timeout=600)
    # The guest's disk really is the VMDK: the harness's overlay is backed by it as vmdk.
    overlay = formats.image_info(vm.work_dir / "overlay.qcow2")
    assert overlay["backing-filename-format"] == "vmdk"
    assert Path(overlay["backing-filename"]) == vmdk.resolve()

    release = vm.ssh_output("cat /etc/os-release")
    assert f'VERSION_ID="{built_image.version}"' in release
    assert 'IMAGE_ID="containerhost"' in release
    # Booted from the verity root the UKI names, with STATE mounted from the same disk.
    assert built_image.roothash in vm.ssh_output("veritysetup status root")
    assert vm.ssh_output("findmnt -no FSTYPE /var") == "ext4"
    vm.shutdown()
