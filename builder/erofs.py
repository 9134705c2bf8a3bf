"""Stage 5: the read-only root file system image (erofs), made by the tree's own mkfs.erofs."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path

from builder.config import Compression
from builder.run import run
from builder.treetool import tree_command


def erofs_command(tree: Path, output: Path, options: Sequence[str]) -> list[str | Path]:
    """The tree's own mkfs.erofs packing `tree` into `output` with `options` besides the fixed
    ones (bench/bench_layout.py packs with other options through this too)."""
    return [*tree_command(tree, "/usr/bin/mkfs.erofs"), "--quiet", *options, output, tree]


def fixed_options(fs_uuid: uuid.UUID) -> list[str]:
    """What every root gets: no timestamps, a stable UUID, /var left empty (STATE is mounted
    there)."""
    return ["-T", "0", "-U", str(fs_uuid), "--exclude-regex=^var/.+"]


def make_erofs(tree: Path, output: Path, compression: Compression, fs_uuid: uuid.UUID) -> None:
    """Pack `tree` into `output`. /var is left empty: STATE is mounted there."""
    options = fixed_options(fs_uuid)
    if compression is not Compression.NONE:
        # Measured on containerhost (docs/building.md): lz4hc above 9 and zstd above 3 cost
        # build time for under 1% of size.
        level = {Compression.LZMA: ",6", Compression.ZSTD: ",3", Compression.LZ4HC: ",9"}
        # Physical cluster: LZ4 gains little from big clusters and they cost random reads;
        # the entropy coders (zstd, lzma, deflate) need room to find their ratio.
        cluster = 65536 if compression in (Compression.LZ4, Compression.LZ4HC) else 262144
        options += [f"-z{compression.value}{level.get(compression, '')}", f"-C{cluster}"]
        # erofs packs small files' tails inline and dedupes fragments only when asked.
        options += ["-Eztailpacking"]
    output.unlink(missing_ok=True)
    run(erofs_command(tree, output, options), env={"SOURCE_DATE_EPOCH": "0"})
