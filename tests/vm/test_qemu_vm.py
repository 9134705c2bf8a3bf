"""The VM harness on real firmware boots: OVMF on a blank disk, on each disk bus, with power
cuts, a hung reset and the command line's give-up when SSH never answers.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from qemu.__main__ import main
from qemu.vm import HARNESS_MARK, RESET_LINE, VM, BootError, DiskBus, VMConfig

# OVMF names the boot option after the device it found, so the console shows which bus was used.
BUS_BOOT_OPTION = {
    DiskBus.VIRTIO: r'BdsDxe: failed to load Boot\d+ "UEFI Misc Device" from PciRoot',
    DiskBus.NVME: r'BdsDxe: failed to load Boot\d+ "UEFI QEMU NVMe Ctrl berth0',
    DiskBus.SATA: r'BdsDxe: failed to load Boot\d+ "UEFI QEMU HARDDISK berth0',
}


@pytest.mark.parametrize("bus", list(DiskBus))
def test_firmware_boots_and_exit_is_reported(tmp_path: Path, blank: Path, bus: DiskBus) -> None:
    config = VMConfig(
        disk=blank, work_dir=tmp_path / "vm", memory_mib=512, disk_bus=bus, no_reboot=True
    )
    with VM(config) as vm:
        # A blank disk has nothing to boot: the firmware says so and drops to its shell.
        vm.wait_for_serial(BUS_BOOT_OPTION[bus], timeout=60)
        assert vm.qmp("query-status")["status"] == "running"

        quitter = threading.Timer(1.0, vm.qmp, args=("quit",))
        quitter.start()
        start = time.monotonic()
        with pytest.raises(BootError) as err:
            vm.wait_for_ssh(timeout=60)
        quitter.join()
        assert time.monotonic() - start < 15
        message = str(err.value)
        assert "QEMU exited before SSH answered (QEMU exit status 0)" in message
        assert "BdsDxe: failed to load" in message
        assert vm.boot_seconds is None


def test_power_cycle_reuses_the_disk_and_appends_the_console(tmp_path: Path, blank: Path) -> None:
    config = VMConfig(disk=blank, work_dir=tmp_path / "vm", memory_mib=512)
    with VM(config) as vm:
        vm.wait_for_serial("BdsDxe: loading", timeout=60)
        overlay = (tmp_path / "vm" / "overlay.qcow2").stat().st_ino
        assert vm.kill() == -9
        first_boot = vm.serial_offset()
        vm.start()
        # By default only what this start printed counts, not the first boot's identical lines.
        vm.wait_for_serial("BdsDxe: loading", timeout=60)
        assert (tmp_path / "vm" / "overlay.qcow2").stat().st_ino == overlay
        assert vm.serial_text().count("BdsDxe: loading") >= 2
        assert "BdsDxe: loading" in vm.serial_text(first_boot)
        # The firmware shell ignores the ACPI power button, so shutdown has to fall back to a kill.
        assert vm.shutdown(timeout=2) == -9
    assert not vm.running


def test_a_machine_silent_after_its_reset_is_power_cycled(tmp_path: Path, blank: Path) -> None:
    # QEMU started with -S never runs the firmware: from outside it looks like the hung reset.
    serial = tmp_path / "serial.log"
    config = VMConfig(
        disk=blank, work_dir=tmp_path / "vm", serial_log=serial, memory_mib=512, extra_args=("-S",)
    )
    long_ago = time.time() - 600

    def console_was(text: str) -> None:
        serial.write_text(text)
        os.utime(serial, (long_ago, long_ago))

    console_was("[   12.5] Reached target multi-user.target.\n")
    with VM(config) as vm:
        first = vm.pid
        # Quiet for long, but the last words are not a reset: a guest that is simply idle.
        assert not vm.recover_hung_reset(silence=300)
        # The reset, but not quiet for long enough yet.
        console_was(f"[   69.1] reboot: Restarting system\n\x1b[2J[   69.2] {RESET_LINE}\r\n")
        assert not vm.recover_hung_reset(silence=900)
        assert vm.pid == first

        assert vm.recover_hung_reset(silence=300)
        assert vm.running and vm.pid != first
        last = vm.serial_text().splitlines()[-1]
        assert last.startswith(f"{HARNESS_MARK} no console output for 6")
        assert last.endswith("s after the guest reset; power-cycled the machine")
        # Once said, the reset is no longer the console's last word.
        assert not vm.recover_hung_reset(silence=0)
        assert vm.pid != first

        # The new QEMU is a whole machine: let it run, and its firmware boots again.
        vm.qmp("cont")
        vm.wait_for_serial("BdsDxe: failed to load", timeout=60)


def test_cli_without_terminal_gives_up_when_ssh_never_answers(
    tmp_path: Path, blank: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(blank), "--memory", "512", "--timeout", "3"]) == 1
    err = capsys.readouterr().err
    assert "waiting for SSH on port" in err
    assert "error: SSH did not answer within 3s" in err
    assert "lines of the serial console" in err
