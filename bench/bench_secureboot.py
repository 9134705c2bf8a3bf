"""Boot to SSH with Secure Boot on and off, on the same image under the same harness.

    .venv/bin/python -m bench.bench_secureboot [--image containerhost] [--boots 3]

"off" is OVMF's plain build; "on" is its Secure Boot build (SMM) with the build's own keys
enrolled (qemu/secureboot.py), so the firmware verifies systemd-boot and the UKI and the
kernel runs in lockdown. Boots alternate (off, on, off, ...) so that a noisy moment of the
machine falls on both; each is a fresh overlay and variable store. Prints the median of each,
every boot, and the ratio on/off. The signing's share of the build is bench/bench_signing.py.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench.bench_image import boot_seconds
from bench.table import print_table
from qemu import VM, Firmware, resolve_disk
from qemu.secureboot import enrolled_vars
from qemu.vm import OVMF_VARS

REPO = Path(__file__).resolve().parent.parent


def secure_boot_seconds(disk: Path, secure: bool, keys: Path) -> float:
    """One boot with Secure Boot on (the keys enrolled) or off; lockdown must agree."""

    def check(vm: VM) -> None:
        state = vm.ssh_output("cat /sys/kernel/security/lockdown")
        if ("[integrity]" in state) != secure:
            raise SystemExit(f"lockdown is {state!r} with Secure Boot {'on' if secure else 'off'}")

    with tempfile.TemporaryDirectory(prefix="berth-bench-sb-") as tmp:
        store = enrolled_vars(keys, Path(tmp) / "enrolled.fd") if secure else OVMF_VARS
        firmware = Firmware.SECURE_BOOT if secure else Firmware.UEFI
        return boot_seconds(disk, check, firmware=firmware, ovmf_vars=store)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="containerhost")
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--keys", type=Path, default=REPO / "keys/secureboot")
    args = parser.parse_args()
    disk = resolve_disk(args.image)
    runs: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.boots):
        for secure in (False, True):
            seconds = secure_boot_seconds(disk, secure, args.keys)
            runs[secure].append(seconds)
            print(
                f"boot with Secure Boot {'on ' if secure else 'off'}: {seconds:.1f} s", flush=True
            )
    off, on = statistics.median(runs[False]), statistics.median(runs[True])
    every = {s: ", ".join(f"{x:.1f}" for x in runs[s]) for s in runs}
    print_table(
        [
            (
                f"boot to SSH, Secure Boot off (median of {args.boots})",
                f"{off:.1f} s",
                every[False],
            ),
            (f"boot to SSH, Secure Boot on (median of {args.boots})", f"{on:.1f} s", every[True]),
            ("on / off", f"{on / off:.2f}", "SMM firmware, signature checks, lockdown"),
        ]
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
