"""Where a machine's parts are (disk, ESP, state, kernel command line, trust anchor) and the
download limits: what the resident daemon and the short-lived update work share.

Deliberately light (no requests, no python-tuf): the daemon imports it and stays small while idle;
the heavy work runs in a child process (see worker.py).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

from updater import files
from updater.disk import bootentries, encryption, firmware, slots
from updater.errors import StorageError

MiB = 1 << 20
REBOOT_REQUIRED_TEXT = "*** System restart required ***\n"
# The TUF root embedded in the verity-protected image: the agent's only trust anchor.
DEFAULT_TRUSTED_ROOT = Path("/usr/share/berth/tuf/root.json")


@dataclass(frozen=True)
class Machine:
    """Where this machine's parts are. `detect()` on a device; tests point them into a tmp dir."""

    disk: Path  # the boot disk: a block device, or a disk image file
    esp: Path  # the mounted ESP
    var: Path  # agent state lives in <var>/lib/berth
    cmdline: Path  # the kernel command line, with roothash=
    loader_entry: Path  # systemd-boot's LoaderEntrySelected EFI variable
    os_release: Path  # IMAGE_ID, IMAGE_VERSION
    machine_id: Path
    trusted_root: Path  # the TUF root embedded in the verity-protected image
    boot_id: Path = Path("/proc/sys/kernel/random/boot_id")
    loader_entries: Path = bootentries.LOADER_ENTRIES  # what systemd-boot could load
    reboot_required: Path = Path("/run/reboot-required")
    # The agent's lock and what its holder does (update/lock.py): a tmpfs, empty at every boot.
    lock_dir: Path = Path("/run/berth")
    arch: str = field(default_factory=platform.machine)
    # The image's list of its /etc and the machine's changes to /etc (update/etcdrift.py).
    etc_list: Path = Path("/usr/lib/berth/etc.json")
    etc_upper: Path = Path("/var/lib/berth/etc/upper")
    # Secure Boot's and lockdown's state, for status (disk/firmware.py).
    efivars: Path = firmware.EFIVARS
    lockdown: Path = firmware.LOCKDOWN
    # What the initrd found of STATE's encryption; the kernel's TPMs (disk/encryption.py).
    state_report: Path = encryption.STATE_REPORT
    tpm_class: Path = encryption.TPM_CLASS

    @classmethod
    def detect(cls) -> Machine:
        """The running Berth machine: the disk holding the booted root, the ESP systemd knows."""
        cmdline = Path("/proc/cmdline")
        roothash = slots.booted_roothash(cmdline)
        return cls(
            disk=slots.find_boot_disk(roothash),
            esp=bootentries.find_esp(),
            var=Path("/var"),
            cmdline=cmdline,
            loader_entry=bootentries.ENTRY_SELECTED,
            os_release=Path("/etc/os-release"),
            machine_id=Path("/etc/machine-id"),
            trusted_root=DEFAULT_TRUSTED_ROOT,
        )

    @property
    def state_dir(self) -> Path:
        return self.var / "lib/berth"


@dataclass(frozen=True)
class FetchOptions:
    """Download limits, passed whole to fetch.stream_to: the one place their defaults live (tests
    shrink them)."""

    timeout: tuple[float, float] = (10.0, 30.0)
    min_rate: int = 4096
    rate_window: float = 30.0
    attempts: int = 5
    backoff: float = 1.0
    state_interval: int = 16 * MiB
    # ... and no more often than this: each record is an fsync of the slot, which stalls the
    # stream, and on a fast link a second's worth is cheaper to fetch again than to record.
    state_seconds: float = 1.0


def write_reboot_required(machine: Machine) -> None:
    """Say that a reboot would start an installed version: `/run/reboot-required`, which kured and
    operators watch, and which the daemon writes again when it re-announces a pending update.

    A file already there is left alone: only its existence is the message, and the agent writes
    it right before the daemon would.
    """
    path = machine.reboot_required
    if path.exists():
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_file_atomic(path, REBOOT_REQUIRED_TEXT.encode())
    except OSError as e:
        raise StorageError(f"cannot write {path}: {e}") from e
