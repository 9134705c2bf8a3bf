"""The preloaded image store: what makes two loads of the same archives byte-identical.

Loading itself runs the image's podman and is proven by the VM test
(tests/vm/test_containers_vm.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from builder.errors import BuildError
from builder.preload import make_reproducible, preload_images

BASE = "a" * 64
TOP = "b" * 64


def fake_store(root: Path, links: tuple[str, str], created: str) -> Path:
    """A store as podman leaves it: two layers with random link names and load times."""
    layers = root / "overlay"
    (layers / "l").mkdir(parents=True)
    for layer, link in zip((BASE, TOP), links, strict=True):
        (layers / layer / "diff").mkdir(parents=True)
        (layers / layer / "link").write_text(link)
        (layers / "l" / link).symlink_to(f"../{layer}/diff")
    (layers / TOP / "lower").write_text(f"l/{links[0]}")
    for name, entry in (
        ("overlay-layers/layers.json", {"id": TOP, "parent": BASE, "created": created}),
        ("overlay-images/images.json", {"id": "c" * 64, "layer": TOP, "created": created}),
    ):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps([entry]))
        os.chmod(root / name, 0o600)
    return root


def snapshot(root: Path) -> dict[str, str]:
    files: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            files[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            files[rel] = f"{path.stat().st_mode:o} {path.read_text()}"
    return files


def test_two_loads_become_identical(tmp_path: Path) -> None:
    first = fake_store(
        tmp_path / "1",
        ("N7QS7ZMEQTH7XFWY6MWVT5JNEA", "AAAAAAAAAAAAAAAAAAAAAAAAAA"),
        "2026-01-01T10:00:00.1Z",
    )
    second = fake_store(
        tmp_path / "2",
        ("ZZZZZZZZZZZZZZZZZZZZZZZZZZ", "QQQQQQQQQQQQQQQQQQQQQQQQQQ"),
        "2026-02-02T11:11:11.2Z",
    )
    make_reproducible(first)
    make_reproducible(second)
    assert snapshot(first) == snapshot(second)

    # Still a consistent store: links resolve to the layers, lower names the base's link.
    layers = first / "overlay"
    base_link = (layers / BASE / "link").read_text()
    assert len(base_link) == 26 and base_link.isalnum() and base_link.isupper()
    assert (layers / "l" / base_link).resolve() == (layers / BASE / "diff").resolve()
    assert (layers / TOP / "lower").read_text() == f"l/{base_link}"
    assert sorted(p.name for p in (layers / "l").iterdir()) == sorted(
        (layers / layer / "link").read_text() for layer in (BASE, TOP)
    )
    layers_json = json.loads((first / "overlay-layers/layers.json").read_text())
    assert layers_json == [{"id": TOP, "parent": BASE, "created": "1970-01-01T00:00:00Z"}]
    assert (first / "overlay-layers/layers.json").stat().st_mode & 0o777 == 0o600


def test_preload_needs_podman_in_the_image(tmp_path: Path) -> None:
    (tmp_path / "tree/usr/bin").mkdir(parents=True)
    with pytest.raises(BuildError) as info:
        preload_images(tmp_path / "tree", [tmp_path / "web.tar"], tmp_path / "scratch")
    assert "no podman" in str(info.value)


@pytest.mark.parametrize("point", ["tmp", "run", "var/tmp"])
def test_preload_refuses_mount_points_that_are_links(tmp_path: Path, point: str) -> None:
    # The loading script mounts over these by their host paths: a link would aim it at the host.
    tree = tmp_path / "tree"
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/podman").write_text("")
    (tree / "var").mkdir()
    (tree / point).symlink_to("/elsewhere")
    with pytest.raises(BuildError) as info:
        preload_images(tree, [tmp_path / "web.tar"], tmp_path / "scratch")
    assert str(info.value) == (
        f"preloading container images: /{point} must be a directory in the image tree, not a "
        "symbolic link or under one"
    )
    assert not (tmp_path / "scratch").exists()


def test_preload_replaces_a_linked_store_inside_the_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An extra tree that made the store an absolute link must not have the host's removed.
    def no_podman_run(*args: object, **kwargs: object) -> None:
        raise BuildError("stopped before loading")

    monkeypatch.setattr("builder.preload.run", no_podman_run)
    tree = tmp_path / "tree"
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/podman").write_text("")
    precious = tmp_path / "host-storage"
    (precious / "keep").mkdir(parents=True)
    (tree / "usr/lib/containers").mkdir(parents=True)
    (tree / "usr/lib/containers/storage").symlink_to(precious)
    with pytest.raises(BuildError, match="stopped before loading"):
        preload_images(tree, [tmp_path / "web.tar"], tmp_path / "scratch")
    assert (precious / "keep").is_dir()
    assert (tree / "usr/lib/containers/storage").is_dir()
