"""Fake release directories (`out/<image>/<version>/`) with small random payloads, for tests."""

from __future__ import annotations

import os
from pathlib import Path

from updater.release.manifest import PAYLOAD_FILES, Manifest, describe
from updater.release.version import Version


def make_release(
    out: Path, version: str, *, image: str = "containerhost", arch: str = "x86_64", size: int = 4096
) -> Path:
    """Write a release directory with random payload files and a matching manifest.json."""
    release_dir = out / image / version
    release_dir.mkdir(parents=True)
    for name in PAYLOAD_FILES:
        (release_dir / name).write_bytes(os.urandom(size))
    manifest = Manifest(
        image=image,
        version=Version.parse(version),
        arch=arch,
        roothash=os.urandom(32).hex(),
        files=describe({name: release_dir / name for name in PAYLOAD_FILES}),
    )
    (release_dir / "manifest.json").write_text(manifest.to_json())
    return release_dir


def roothash_of(release_dir: Path) -> str:
    return Manifest.from_json((release_dir / "manifest.json").read_text()).roothash
