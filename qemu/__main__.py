"""`python -m qemu run IMAGE_OR_PATH` and `./build.py run`: boot an image for a person to use.

On a terminal the serial console and QEMU monitor share it (Ctrl-A X quits); without one the console
goes to a log file and progress is printed as plain lines until the guest answers SSH.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

from builder.errors import BuildError
from builder.log import log
from qemu.vm import VM, Accel, DiskBus, Firmware, VMConfig, VMError, resolve_disk

# `--tpm` without DIR: the state goes beside the machine's disk (tpm_beside_disk).
TPM_DEFAULT = object()


def _pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `run`, for embedding in another command line (build.py)."""
    parser.add_argument(
        "image",
        nargs="?",
        default="containerhost",
        help="disk image file, or an image name resolved to out/<name>/latest/disk.* "
        "(default: containerhost)",
    )
    parser.add_argument("--memory", type=int, default=2048, help="guest memory in MiB")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--bus", type=DiskBus, choices=list(DiskBus), default=DiskBus.VIRTIO)
    parser.add_argument("--disk-size", help="grow the boot disk's overlay to this size, e.g. 8G")
    parser.add_argument(
        "--fw-cfg",
        type=_pair,
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="pass FILE as fw_cfg entry NAME, e.g. opt/org.berth/config=config.ign",
    )
    parser.add_argument(
        "--credential",
        type=_pair,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="pass a systemd credential",
    )
    parser.add_argument(
        "--ssh-key", type=Path, metavar="PUBFILE", help="also authorize this public key for root"
    )
    parser.add_argument("--disk", type=Path, action="append", default=[], help="an extra disk")
    parser.add_argument("--accel", type=Accel, choices=list(Accel), default=Accel.AUTO)
    parser.add_argument(
        "--no-snapshot", action="store_true", help="write to the image instead of an overlay"
    )
    parser.add_argument(
        "--no-reboot",
        action="store_true",
        help="exit QEMU when the guest reboots (a new VM's first start resets once, after "
        "systemd-boot enrols the image's Secure Boot keys)",
    )
    parser.add_argument(
        "--secure-boot",
        action="store_true",
        help="boot OVMF's Secure Boot build in setup mode: systemd-boot enrols the image's keys "
        "from its ESP and the machine then enforces them",
    )
    parser.add_argument(
        "--tpm",
        nargs="?",
        type=Path,
        const=TPM_DEFAULT,
        metavar="DIR",
        help="attach a software TPM 2.0 (swtpm) whose state is kept in DIR, created if missing: "
        "it persists across QEMU restarts and runs, and a new directory is a new TPM; without "
        "DIR it is kept beside the machine's disk: in the VM's work dir with the overlay "
        "(removed with it when the VM ends), or with --no-snapshot in <disk>.tpm beside the "
        "disk file, which keeps what is sealed to it",
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for SSH (without a terminal)"
    )


def tpm_beside_disk(disk: Path, snapshot: bool, work_dir: Path) -> Path:
    """Where `--tpm` keeps the state without DIR: with the disk whose secrets it seals."""
    return work_dir / "tpm" if snapshot else disk.parent / f"{disk.name}.tpm"


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_vm(args: argparse.Namespace, interactive: bool) -> int:
    """Boot the image described by parsed `run` arguments; return QEMU's exit status."""
    authorized: tuple[str, ...] = ()
    if args.ssh_key is not None:
        if not args.ssh_key.is_file():
            raise VMError(f"public key not found: {args.ssh_key}")
        authorized = (args.ssh_key.read_text().strip(),)
    disk = resolve_disk(args.image)
    with contextlib.ExitStack() as stack:
        work_dir: Path | None = None
        tpm: Path | None = args.tpm
        if args.tpm is TPM_DEFAULT:
            # The TPM's directory is named before the VM exists, so the work dir is made here
            # (and removed after the VM closes) instead of by the VM.
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="berth-vm-")))
            tpm = tpm_beside_disk(disk, not args.no_snapshot, work_dir)
        config = VMConfig(
            disk=disk,
            memory_mib=args.memory,
            cpus=args.cpus,
            disk_bus=args.bus,
            extra_disks=tuple(args.disk),
            fw_cfg=tuple((name, Path(file)) for name, file in args.fw_cfg),
            credentials=tuple(args.credential),
            authorized_keys=authorized,
            snapshot=not args.no_snapshot,
            disk_size=args.disk_size,
            accel=args.accel,
            interactive=interactive,
            no_reboot=args.no_reboot,
            work_dir=work_dir,
            firmware=Firmware.SECURE_BOOT if args.secure_boot else Firmware.UEFI,
            tpm=tpm,
        )
        secure = " with Secure Boot (setup mode)" if args.secure_boot else ""
        log(f"booting {config.disk}{secure}")
        if tpm is not None:
            log(f"software TPM (swtpm), state in {tpm}")
        vm = stack.enter_context(VM(config))
        login = shlex.join(vm.ssh_command())
        if interactive:
            log(f"log in with: {login}")
            log("serial console follows; Ctrl-A X quits QEMU, Ctrl-A C toggles the monitor")
            return vm.wait_exit()
        log(f"serial console: {vm.serial_log}")
        log(f"waiting for SSH on port {vm.ssh_port} ({vm.accel})")
        seconds = vm.wait_for_ssh(timeout=args.timeout)
        log(f"SSH answered after {seconds:.1f}s; log in with: {login}")
        log("the VM runs until it powers off; Ctrl-C shuts it down")
        try:
            return vm.wait_exit()
        except KeyboardInterrupt:
            log("shutting down")
            return vm.shutdown(timeout=60)


def main(argv: list[str] | None = None) -> int:
    """Command line entry; `argv` may start with the subcommand `run` or go straight to its args."""
    args_list = sys.argv[1:] if argv is None else list(argv)
    if args_list[:1] == ["run"]:
        args_list = args_list[1:]
    parser = argparse.ArgumentParser(
        prog="python -m qemu run", description="Boot a Berth disk image under QEMU."
    )
    add_run_arguments(parser)
    args = parser.parse_args(args_list)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    # Without a terminal we are stopped by signals; turn SIGTERM into the Ctrl-C path so the
    # guest is shut down and the work dir removed instead of leaving QEMU behind.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return run_vm(args, interactive)
    except BuildError as e:
        log(f"error: {e}")
        if e.hint:
            log(f"hint: {e.hint}")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
