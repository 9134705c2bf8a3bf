"""Run programs from the image's own tree on the build host, without chroot or root.

The tree's dynamic loader runs the tree's binary against the tree's libraries, so the image is
built with its own mkfs.erofs, veritysetup, depmod and mke2fs — the versions that match its kernel
and userspace — whatever Debian release the build host runs.
"""

from __future__ import annotations

from pathlib import Path

from builder.elf import tree_path
from builder.errors import BuildError

LOADER = "/usr/lib64/ld-linux-x86-64.so.2"
# systemd's programs find libsystemd-shared through an absolute RUNPATH, which would name the
# build host's (another systemd version) rather than the tree's.
LIBRARY_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib",
    "/usr/lib64",
    "/usr/lib/x86_64-linux-gnu/systemd",
)


def tree_command(tree: Path, program: str, *, argv0: str | None = None) -> list[str]:
    """argv prefix that runs `program` (an absolute path inside the tree) from the tree."""
    loader = tree_path(tree, LOADER)
    binary = tree_path(tree, program)
    if not loader.is_file() or not binary.is_file():
        raise BuildError(f"{program} (or the dynamic loader) is missing from the image tree")
    libs = ":".join(str(tree_path(tree, d)) for d in LIBRARY_DIRS)
    cmd = [str(loader), "--inhibit-cache", "--library-path", libs]
    if argv0 is not None:
        cmd += ["--argv0", argv0]
    return [*cmd, str(binary)]
