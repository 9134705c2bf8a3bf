"""Measure every platform format: conversion time and size, from a built image's disk.raw.

    .venv/bin/python -m bench.bench_formats [--image containerhost] [--disk PATH] [--runs 3]

Converts a sparse copy of out/<image>/latest/disk.raw (or --disk) into each format in a temporary
directory, `--runs` times, and prints the median time, the file size, the allocated size and the
size relative to the raw disk's allocated bytes (what any format has to carry).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from builder import formats
from builder.config import OutputFormat
from builder.run import run

REPO = Path(__file__).resolve().parent.parent
MB = 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="containerhost")
    parser.add_argument("--disk", type=Path, help="a disk.raw (default: the image's latest)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    source = args.disk or REPO / "out" / args.image / "latest" / "disk.raw"
    if not source.is_file():
        print(f"{source} does not exist: build the image first (./build.py build)", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory(prefix="berth-bench-formats-") as tmp:
        raw = Path(tmp) / "disk.raw"
        run(["cp", "--sparse=always", source, raw])
        vmdk = Path(tmp) / "disk.vmdk"
        appliance = formats.Appliance(args.image, "0.0.0")
        steps: dict[OutputFormat, Callable[[Path], None]] = {
            OutputFormat.QCOW2: lambda out: formats.make_qcow2(raw, out),
            OutputFormat.VMDK: lambda out: formats.make_vmdk(raw, out),
            # The VMDK step above always runs first: the OVA time is the packing alone.
            OutputFormat.OVA: lambda out: formats.make_ova(vmdk, out, appliance),
            OutputFormat.VHD: lambda out: formats.make_vhd(raw, out),
            OutputFormat.GCE: lambda out: formats.make_gce(raw, out),
            OutputFormat.RAW_ZST: lambda out: formats.make_raw_zst(raw, out),
        }
        base = raw.stat().st_blocks * 512
        rows = [
            ("raw", "disk.raw", f"{raw.stat().st_size / MB:.0f}", f"{base / MB:.0f}", "-", "1.00"),
        ]
        for fmt in formats.ORDER:
            out = Path(tmp) / formats.file_name(fmt)
            seconds = []
            for _ in range(args.runs):
                start = time.monotonic()
                steps[fmt](out)
                seconds.append(time.monotonic() - start)
            stat = out.stat()
            rows.append(
                (
                    str(fmt),
                    out.name,
                    f"{stat.st_size / MB:.0f}",
                    f"{stat.st_blocks * 512 / MB:.0f}",
                    f"{statistics.median(seconds):.1f}",
                    f"{stat.st_blocks * 512 / base:.2f}",
                )
            )

    print(f"\nBerth {args.image}: {source} ({args.runs} runs, median time)")
    header = ("format", "file", "size MB", "allocated MB", "seconds", "× raw allocated")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
