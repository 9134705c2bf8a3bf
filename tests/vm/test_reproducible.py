"""Same inputs, same bytes: rebuilding a version gives an identical payload (initrd included).

It boots nothing, but it lives with the VM tests because it needs what they need: the session's
built image and the bootstrapped package tree, minutes of work the fast tier never does.
"""

from __future__ import annotations

from pathlib import Path

from builder.config import load_image
from builder.image import BuildResult, build_image
from tests.support import REPO


def test_rebuild_of_a_version_is_byte_identical(built_image: BuildResult, tmp_path: Path) -> None:
    config = load_image("containerhost", REPO / "images")
    again = build_image(config, built_image.version, REPO, out_dir=tmp_path)
    first = (built_image.output / "manifest.json").read_text()
    second = (again.output / "manifest.json").read_text()
    # The manifest holds the sha256 of root.erofs, root.verity and uki.efi (kernel + initrd).
    assert first == second
    assert again.roothash == built_image.roothash
    for name in ("packages.txt", "cmdline.txt", "sbom.spdx.json"):
        assert (again.output / name).read_bytes() == (built_image.output / name).read_bytes()
