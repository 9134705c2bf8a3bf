"""Measure the image build and boot: cold build, warm rebuild, sizes, boot time to SSH.

    .venv/bin/python -m bench.bench_image [--image containerhost] [--boots 3] [--skip-cold]
                                           [--compression lz4hc]

Prints a table with the figures, the targets from the image issue and their ratios. Builds go to
out/<image>/<version>/ like any build; the cold build bootstraps again (--refresh).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.table import print_table
from builder.config import Compression, load_image
from builder.image import build_image
from qemu import VM, VMConfig
from updater.release.manifest import PAYLOAD_FILES
from updater.release.version import Version

REPO = Path(__file__).resolve().parent.parent

MB = 1e6


def boot_seconds(disk: Path, check: Callable[[VM], None] | None = None, **options: Any) -> float:
    """Seconds from QEMU's start to SSH, on a fresh overlay; `check` looks at the booted guest
    (outside the figure) and `options` are more VMConfig fields (the firmware, say)."""
    with tempfile.TemporaryDirectory(prefix="berth-bench-") as tmp:
        config = VMConfig(disk=disk, disk_size="8G", work_dir=Path(tmp), **options)
        with VM(config) as vm:
            seconds = vm.wait_for_ssh(timeout=900)
            if check is not None:
                check(vm)
            vm.shutdown()
            return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="containerhost")
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--skip-cold", action="store_true", help="reuse the package cache")
    parser.add_argument("--compression", choices=[c.value for c in Compression])
    args = parser.parse_args()

    config = load_image(args.image, REPO / "images")
    if args.compression:
        config = dataclasses.replace(config, compression=Compression(args.compression))
    base = Version(9000, int(time.time()) % 100000, 0)
    rows: list[tuple[str, str, str]] = []

    first = build_image(config, base, REPO, refresh=not args.skip_cold)
    label = "cold build (bootstrap included)" if not args.skip_cold else "build (cached packages)"
    rows.append((label, f"{first.seconds:.1f} s", ""))
    bumped = Version(base.major, base.minor, base.patch + 1)
    warm = build_image(config, bumped, REPO)
    rows.append(
        (
            "warm rebuild after a version bump",
            f"{warm.seconds:.1f} s",
            f"target ≤ 30 s: {warm.seconds / 30:.2f}×",
        )
    )

    out = warm.output
    raw = (out / "disk.raw").stat()
    rows.append(("disk.raw apparent size", f"{raw.st_size / MB:.0f} MB", ""))
    rows.append(("disk.raw allocated", f"{raw.st_blocks * 512 / MB:.0f} MB", ""))
    rows.append(("disk.qcow2", f"{(out / 'disk.qcow2').stat().st_size / MB:.0f} MB", ""))
    payload = sum((out / name).stat().st_size for name in PAYLOAD_FILES)
    for name in PAYLOAD_FILES:
        rows.append((f"  {name}", f"{(out / name).stat().st_size / MB:.1f} MB", ""))
    rows.append(
        (
            "release payload",
            f"{payload / MB:.0f} MB",
            f"target ≤ 200 MB: {payload / 200e6:.2f}×; Flatcar 340–530 MB",
        )
    )

    boots = [boot_seconds(out / "disk.qcow2") for _ in range(args.boots)]
    median = statistics.median(boots)
    rows.append(
        (
            "boot to SSH (" + ", ".join(f"{b:.0f}" for b in boots) + " s)",
            f"{median:.1f} s median",
            f"target ≤ 90 s: {median / 90:.2f}×; mkosi 119–132 s",
        )
    )

    print(f"\nBerth {config.name}, erofs {config.compression}")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
