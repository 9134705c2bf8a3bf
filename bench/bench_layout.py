"""Measure how mkfs.erofs options keep a one-package change's root.erofs close to the base's.

    .venv/bin/python -m bench.bench_layout [--image containerhost] [--add jq] [--remove curl]
                                           [--workdir DIR] [--trees DIR] [--read-runs 3]

Builds three image trees from the same package cache (the base, the base with `--add`, the base
without `--remove`), stopping each build where it would make its root file system, so no disk is
assembled. Then, for each candidate option set, packs the three trees with the tree's own
mkfs.erofs (the build's fixed options beside the candidate's, one UUID for all) and prints the
base's root size and, for each pair, the blocks of the new root the base has nowhere (what a
seeded update fetches, bench/bench_delta.py) and the share it has in place. Last, the read cost:
the median of `--read-runs` cold reads of the whole base root (loop-mounted read-only, page
cache dropped, `tar cf - .` into a pipe). `--trees DIR` keeps the trees there and reuses them.

Runs as root, one mkfs.erofs at a time (two workers, its default). Compare figures from one run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

from bench.bench_delta import layout, package_variants
from bench.table import print_table
from builder import image
from builder.config import load_image
from builder.erofs import erofs_command, fixed_options
from builder.image import build_image
from builder.run import run
from updater.release.blockindex import BLOCK, block_count
from updater.release.version import Version

REPO = Path(__file__).resolve().parent.parent
# builder/erofs.py's options that no candidate changes; the UUID is one for every image here.
FIXED = fixed_options(uuid.UUID(int=0x5EED))
ZSTD = ("-zzstd,3", "-C262144")
# The option sets measured; "(build)" marks builder/erofs.py's, which every other row is read
# against.
CANDIDATES: dict[str, tuple[str, ...]] = {
    "zstd,3 -C256k tailpacking (build)": (*ZSTD, "-Eztailpacking"),
    "zstd,3 -C256k": ZSTD,
    "zstd,3 -C256k noinline_data": (*ZSTD, "-Enoinline_data"),
    "zstd,3 -C256k tailpacking noinline_data": (*ZSTD, "-Eztailpacking,noinline_data"),
    "zstd,3 -C256k tailpacking dedupe": (*ZSTD, "-Eztailpacking,dedupe"),
    "zstd,3 -C256k fragments": (*ZSTD, "-Efragments"),
    "zstd,3 -C256k all-fragments": (*ZSTD, "-Eall-fragments"),
    "zstd,3 -C64k tailpacking": ("-zzstd,3", "-C65536", "-Eztailpacking"),
    "zstd,3 -C16k tailpacking": ("-zzstd,3", "-C16384", "-Eztailpacking"),
    "zstd,3 -C4k tailpacking": ("-zzstd,3", "-C4096", "-Eztailpacking"),
    "lz4hc,9 -C64k tailpacking": ("-zlz4hc,9", "-C65536", "-Eztailpacking"),
    "uncompressed": (),
    "uncompressed noinline_data": ("-Enoinline_data",),
}
MB = 1e6


class _TreeTaken(Exception):
    """Raised where the build would make root.erofs: the tree is all this bench needs."""


def build_trees(
    image_name: str, add: str, remove: str, work: Path, offline: bool
) -> dict[str, Path]:
    """The image trees of the base, base + `add` and base - `remove`, kept under `work`."""
    variants = package_variants(load_image(image_name, REPO / "images"), add, remove)
    trees = {name: work / f"tree{name}" for name in variants}
    for patch, (name, variant) in enumerate(variants.items()):
        if trees[name].is_dir():
            continue

        def take(tree: Path, *_: object, dest: Path = trees[name]) -> None:
            # Taken away (the build removes its tree at the end), by a rename where it can:
            # the tree's files are hard links into the package cache.
            try:
                tree.rename(dest)
            except OSError:
                shutil.copytree(tree, dest, symlinks=True)
            raise _TreeTaken

        print(f"building the {name} tree", flush=True)
        with mock.patch.object(image, "make_erofs", take), contextlib.suppress(_TreeTaken):
            build_image(
                variant, Version(8000, 0, patch), REPO, keys_dir=work / "keys", offline=offline
            )
    return trees


def make_root(tree: Path, options: Sequence[str], output: Path) -> float:
    """Pack `tree` into `output` as builder/erofs.py would with `options`; the seconds taken."""
    output.unlink(missing_ok=True)
    start = time.perf_counter()
    run(erofs_command(tree, output, [*FIXED, *options]), env={"SOURCE_DATE_EPOCH": "0"})
    return time.perf_counter() - start


def new_blocks(old: Path, new: Path) -> tuple[int, float]:
    """Blocks of `new` that `old` has nowhere, and the share of `new`'s it has in place."""
    in_place, anywhere = layout(old, new)
    blocks = block_count(new.stat().st_size)
    return round(blocks * (1 - anywhere)), in_place


def cold_read(root: Path, mountpoint: Path, runs: int) -> float:
    """Median seconds to read every file of `root` with an empty page cache."""
    times = []
    mountpoint.mkdir(exist_ok=True)
    for _ in range(runs):
        run(["mount", "-t", "erofs", "-o", "ro,loop", root, mountpoint])
        try:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            start = time.perf_counter()
            # Through a pipe: GNU tar reads no file contents when its archive is /dev/null.
            with subprocess.Popen(
                ["tar", "cf", "-", "."], cwd=mountpoint, stdout=subprocess.PIPE
            ) as tar:
                assert tar.stdout is not None
                while tar.stdout.read(1 << 20):
                    pass
            if tar.returncode:
                raise SystemExit(f"tar failed reading {root} ({tar.returncode})")
            times.append(time.perf_counter() - start)
        finally:
            run(["umount", mountpoint])
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", default="containerhost")
    p.add_argument("--add", default="jq", help="the package one variant adds")
    p.add_argument("--remove", default="curl", help="the package one variant removes")
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    p.add_argument("--trees", type=Path, help="keep the image trees here (and reuse them)")
    p.add_argument("--read-runs", type=int, default=3, help="0: no read timing")
    p.add_argument("--offline", action="store_true", help="build from the cached trees alone")
    p.add_argument("--only", action="append", help="measure only this candidate (repeatable)")
    args = p.parse_args()
    names = args.only or list(CANDIDATES)
    if unknown := [n for n in names if n not in CANDIDATES]:
        raise SystemExit(f"unknown candidate(s) {unknown}; known: {list(CANDIDATES)}")
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-layout-") as tmp:
        work = Path(tmp)
        trees = build_trees(args.image, args.add, args.remove, args.trees or work, args.offline)
        base, *others = trees
        # One cell of print_table's note column, aligned by hand: mkfs time, each pair, read.
        header = f"{'mkfs':>5}" + "".join(f"  {o + ': new blocks, in place':>28}" for o in others)
        header += f"  {'cold read':>9}"
        rows = [("options", "root", header)]
        for name in names:
            roots, mkfs = {}, 0.0
            for variant, tree in trees.items():
                roots[variant] = work / f"root{variant}.erofs"
                seconds = make_root(tree, CANDIDATES[name], roots[variant])
                if variant == base:
                    mkfs = seconds
            cells = [f"{mkfs:.0f} s".rjust(5)]
            for other in others:
                count, in_place = new_blocks(roots[base], roots[other])
                cells.append(f"{count} = {count * BLOCK / MB:.1f} MB, {in_place:6.1%}".rjust(28))
            if args.read_runs:
                seconds = cold_read(roots[base], work / "mnt", args.read_runs)
                cells.append(f"{seconds:.2f} s".rjust(9))
            size = roots[base].stat().st_size
            rows.append((name, f"{size / MB:.1f} MB", "  ".join(cells)))
            print_table([rows[-1]], 10)
            for root in roots.values():
                root.unlink()
        print()
        print_table(rows, 10)
        if args.trees is None:
            for tree in trees.values():
                shutil.rmtree(tree)
    return 0


if __name__ == "__main__":
    sys.exit(main())
