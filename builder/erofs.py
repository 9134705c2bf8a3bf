"""Stage 5: the read-only root file system image (erofs), made by the tree's own mkfs.erofs."""

from __future__ import annotations

import uuid
from pathlib import Path

from builder.config import Compression
from builder.run import run
from builder.treetool import tree_command


def make_erofs(tree: Path, output: Path, compression: Compression, fs_uuid: uuid.UUID) -> None:
    """Pack `tree` into `output`. /var is left empty: STATE is mounted there."""
    options = ["-T", "0", "-U", str(fs_uuid), "--exclude-regex=^var/.+"]
    if compression is not Compression.NONE:
        level = {Compression.LZMA: ",6", Compression.ZSTD: ",9", Compression.LZ4HC: ",9"}
        # Big physical clusters compress better; 64 KiB keeps random reads cheap.
        options += [f"-z{compression.value}{level.get(compression, '')}", "-C65536"]
        # erofs packs small files' tails inline and dedupes fragments only when asked.
        options += ["-Eztailpacking"]
    output.unlink(missing_ok=True)
    run(
        [*tree_command(tree, "/usr/bin/mkfs.erofs"), "--quiet", *options, output, tree],
        env={"SOURCE_DATE_EPOCH": "0"},
    )
