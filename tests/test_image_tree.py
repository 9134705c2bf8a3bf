"""What the image stage itself writes into the tree after the overlays stays inside it."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.errors import BuildError
from builder.image import MOUNT_POINTS, _make_mount_points


def test_mount_points_are_made_and_a_link_there_is_refused(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "var").mkdir(parents=True)
    _make_mount_points(tree)
    assert all((tree / point.lstrip("/")).is_dir() for point in MOUNT_POINTS)
    (tree / "home").rmdir()
    (tree / "home").symlink_to("/var/home")  # as an extra tree in the Silverblue style might
    with pytest.raises(BuildError) as info:
        _make_mount_points(tree)
    assert str(info.value) == (
        "/home is a mount point of the running system, but the image tree has a symbolic link "
        "there (to /var/home); expected a directory"
    )
