"""The Berth VM harness: boot disk images under QEMU and OVMF, reach them over SSH and testinfra."""

from qemu.vm import (
    VM,
    Accel,
    BootError,
    DiskBus,
    Firmware,
    SSHError,
    VMConfig,
    VMError,
    kvm_usable,
    resolve_disk,
)

__all__ = [
    "VM",
    "Accel",
    "BootError",
    "DiskBus",
    "Firmware",
    "SSHError",
    "VMConfig",
    "VMError",
    "kvm_usable",
    "resolve_disk",
]
