"""Boot to SSH with Secure Boot on and off, on the same image under the same harness.

    .venv/bin/python -m bench.bench_secureboot [--image containerhost] [--boots 3]

Three firmware set-ups, each with the build's own keys enrolled (qemu/secureboot.py):
"off" is OVMF's 4M build with Secure Boot switched off in its variables (keys kept, nothing
checked, as a firmware setup screen leaves it); "on" is the same firmware enforcing, so it
verifies systemd-boot and the UKI and the kernel runs in lockdown; "on, SMM" is OVMF's Secure
Boot build, whose variables only SMM code may write (what the VM tests boot, and what a real
machine's firmware is like). Boots rotate through the three, so that a noisy moment of the
machine falls on each; every boot gets a fresh overlay and variable store. Prints the median of
each, every boot, and the ratios to "off". The signing's share of the build is
bench/bench_signing.py.
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

REPO = Path(__file__).resolve().parent.parent


SETUPS = {
    "off": (Firmware.UEFI, False),
    "on": (Firmware.UEFI, True),
    "on, SMM": (Firmware.SECURE_BOOT, True),
}


def secure_boot_seconds(disk: Path, setup: str, keys: Path) -> float:
    """One boot in `setup` (SETUPS); lockdown must agree with the firmware's enforcing."""
    firmware, enforce = SETUPS[setup]

    def check(vm: VM) -> None:
        state = vm.ssh_output("cat /sys/kernel/security/lockdown")
        if ("[integrity]" in state) != enforce:
            raise SystemExit(f"lockdown is {state!r} with Secure Boot {setup}")

    with tempfile.TemporaryDirectory(prefix="berth-bench-sb-") as tmp:
        store = enrolled_vars(keys, Path(tmp) / "vars.fd", enforce=enforce)
        return boot_seconds(disk, check, firmware=firmware, ovmf_vars=store)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="containerhost")
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--keys", type=Path, default=REPO / "keys/secureboot")
    args = parser.parse_args()
    disk = resolve_disk(args.image)
    runs: dict[str, list[float]] = {setup: [] for setup in SETUPS}
    for _ in range(args.boots):
        for setup in SETUPS:
            seconds = secure_boot_seconds(disk, setup, args.keys)
            runs[setup].append(seconds)
            print(f"boot with Secure Boot {setup}: {seconds:.1f} s", flush=True)
    medians = {setup: statistics.median(times) for setup, times in runs.items()}
    rows = []
    for setup, times in runs.items():
        every = ", ".join(f"{t:.1f}" for t in times)
        rows.append(
            (
                f"boot to SSH, Secure Boot {setup} (median of {args.boots})",
                f"{medians[setup]:.1f} s",
                every,
            )
        )
    for setup in ("on", "on, SMM"):
        rows.append((f"{setup} / off", f"{medians[setup] / medians['off']:.2f}", ""))
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
