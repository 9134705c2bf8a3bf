"""Container images baked into the root: a read-only podman image store inside /usr.

The store lives in the verity-protected root, so its images are there offline from the first boot,
are replaced with the OS on every update and can never be tampered with or pulled.
/usr/share/containers/storage.conf (overlays/containerhost) names it in `additionalimagestores`;
podman reads images from it and keeps containers, volumes and pulled images on STATE.

The store is written by the image's own podman, run from the tree in a private mount namespace
(`unshare` + `chroot`): the version that will read the store writes it, whatever podman the build
host has or lacks, and the image's podman re-executes itself (to unpack layers), which rules out
running it through the tree's dynamic loader as the other build tools are.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from builder.errors import BuildError
from builder.overlay import host_path
from builder.run import find_tool, run

# Path of the store inside the image; overlays/containerhost/usr/share/containers/storage.conf.j2
# receives it as the template variable `preload_store`.
STORE = "/usr/lib/containers/storage"

# What _SCRIPT mounts over inside the tree.
_MOUNT_POINTS = ("/proc", "/sys", "/dev", "/run", "/tmp", "/var/tmp")

# What podman keeps in a graph root besides images and layers: its own database and the state of
# containers and volumes. A read-only image store has no use for them.
_RUNTIME_STATE = (
    "db.sql",
    "bolt_state.db",
    "libpod",
    "volumes",
    "networks",
    "overlay-containers",
    "defaultNetworkBackend",
)
# What podman records as the time of loading, replaced so that a rebuild is byte-identical.
_EPOCH = "1970-01-01T00:00:00Z"

# Runs in a private mount namespace: nothing it mounts is visible outside or outlives it.
# $1: the tree, $2: a scratch directory on disk, then the archives.
_SCRIPT = r"""
set -eu
tree=$1 scratch=$2
shift 2
# podman unpacks layers in a chroot of its own, which needs its / to be a mount point.
mount --bind "$tree" "$tree"
mount -t proc proc "$tree/proc"
mount --rbind /sys "$tree/sys"
mount --rbind /dev "$tree/dev"
mount -t tmpfs tmpfs "$tree/run"
mount -t tmpfs tmpfs "$tree/tmp"
mkdir -p "$scratch/var-tmp" "$tree/var/tmp"
mount --bind "$scratch/var-tmp" "$tree/var/tmp"
mkdir "$tree/run/preload"
i=0
for archive in "$@"; do
    i=$((i + 1))
    touch "$tree/run/preload/$i.tar"
    mount --bind "$archive" "$tree/run/preload/$i.tar"
    chroot "$tree" /usr/bin/podman \
        --root "$STORE" --runroot /run/preload/runroot --storage-driver overlay \
        --events-backend none --cgroup-manager cgroupfs --log-level warning \
        load --quiet --input "/run/preload/$i.tar"
done
chroot "$tree" /usr/bin/podman \
    --root "$STORE" --runroot /run/preload/runroot --storage-driver overlay \
    --events-backend none --cgroup-manager cgroupfs --log-level warning \
    images --format json > "$scratch/images.json"
"""


@dataclass(frozen=True)
class PreloadedImage:
    """One name of an image in the store, for the log and the SBOM."""

    name: str  # "docker.io/library/nginx:1.27"
    image_id: str  # podman's image id: the sha256 of the image's config, 64 hex digits


def preload_images(tree: Path, archives: Sequence[Path], scratch: Path) -> list[PreloadedImage]:
    """Load `archives` into the tree's read-only image store; return the names it holds."""
    if not (tree / "usr/bin/podman").is_file():
        raise BuildError(
            "the image definition lists images to preload, but the image has no podman",
            hint="preload needs podman in `packages` (containerhost has it)",
        )
    where = "preloading container images"
    # The script mounts over these by their host paths: a link there would aim the mounts (and
    # the mkdir before them) at the build host instead of the tree.
    for point in _MOUNT_POINTS:
        if host_path(tree, point, where, follow=True) != tree / point.lstrip("/"):
            raise BuildError(
                f"{where}: {point} must be a directory in the image tree, not a symbolic link "
                "or under one"
            )
    store = host_path(tree, STORE, where)
    if store.is_symlink():
        store.unlink()
    elif store.exists():
        shutil.rmtree(store)
    store.mkdir(parents=True)
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    try:
        run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--fork",
                "--",
                find_tool("sh"),
                "-c",
                _SCRIPT,
                "preload",
                tree,
                scratch,
                *archives,
            ],
            # podman looks for per-user configuration under $HOME: root's home in the tree, as on
            # the machine, and never the build user's.
            env={"STORE": STORE, "HOME": "/root"},
            capture=True,
        )
        listing = json.loads((scratch / "images.json").read_text() or "[]")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for name in _RUNTIME_STATE:
        path = store / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    make_reproducible(store)
    return sorted(
        (
            PreloadedImage(name, str(image.get("Id", "")))
            for image in listing
            for name in image.get("Names") or []
        ),
        key=lambda found: found.name,
    )


def make_reproducible(store: Path) -> None:
    """Replace what differs between two loads of the same archives: load times and link names.

    The overlay driver names each layer's directory by a random 26-character link (overlay/l/...)
    to keep mount options short; a name derived from the layer id serves the same purpose.
    """
    for name in ("overlay-images/images.json", "overlay-layers/layers.json"):
        path = store / name
        if not path.is_file():
            continue
        entries = json.loads(path.read_text())
        for entry in entries:
            if "created" in entry:
                entry["created"] = _EPOCH
        _rewrite(path, json.dumps(entries, separators=(",", ":")))
    layers = store / "overlay"
    renamed: dict[str, str] = {}
    for link in sorted(layers.glob("*/link")):
        layer = link.parent.name
        old = link.read_text().strip()
        new = base64.b32encode(hashlib.sha256(layer.encode()).digest()).decode()[:26]
        renamed[old] = new
        _rewrite(link, new)
        (layers / "l" / old).unlink(missing_ok=True)
        (layers / "l" / new).symlink_to(f"../{layer}/diff")
    for lower in sorted(layers.glob("*/lower")):
        parts = lower.read_text().strip().split(":")
        _rewrite(lower, ":".join(f"l/{renamed[p.removeprefix('l/')]}" for p in parts))


def _rewrite(path: Path, text: str) -> None:
    mode = path.stat().st_mode & 0o7777
    path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
