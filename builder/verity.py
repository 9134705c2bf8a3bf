"""Stage 5b: the dm-verity hash tree over the root image, made by the tree's own veritysetup."""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path

from builder.errors import BuildError
from builder.run import run
from builder.treetool import tree_command


def make_verity(tree: Path, data: Path, hash_output: Path, image: str, seed: str) -> str:
    """Write the hash tree for `data` to `hash_output` and return the root hash (hex).

    The salt derives from the `image` name alone, so that every release of one image hashes
    its blocks alike: the tree of the slot a machine booted is then the index of the blocks it
    already has, and a seeded update (updater/update/seeded.py) compares it with the new tree
    without reading the booted root. The superblock UUID derives from `seed` (image and
    version). A rebuild of the same version gives the same root hash.
    """
    salt = hashlib.sha256(f"berth-verity-salt:{image}".encode()).hexdigest()
    sb_uuid = uuid.UUID(bytes=hashlib.sha256(f"berth-verity-uuid:{seed}".encode()).digest()[:16])
    hash_output.unlink(missing_ok=True)
    out = run(
        [
            *tree_command(tree, "/usr/sbin/veritysetup"),
            "format",
            f"--salt={salt}",
            f"--uuid={sb_uuid}",
            "--hash=sha256",
            "--data-block-size=4096",
            "--hash-block-size=4096",
            data,
            hash_output,
        ],
        capture=True,
    ).stdout.decode()
    match = re.search(r"^Root hash:\s+([0-9a-f]{64})$", out, re.M)
    if match is None:
        raise BuildError(f"veritysetup printed no root hash:\n{out}")
    return match.group(1)
