"""Asking the archive which versions a build would install: a real apt-get against a real
Debian-format repository that nginx serves on loopback, made here from .debs built with dpkg-deb.

A version published in the archive changes the answer (and so the tree's cache key); the same
archive gives the same answer; an archive that cannot be reached is an error naming it; the
tree cache reuses, rebuilds or (offline) falls back as the answers say.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.archive import ArchiveUnreachable, resolve
from builder.errors import BuildError
from builder.rootfs import cached_trees, changed_versions, stub_status
from builder.run import find_tool
from tests.support.misbehaving_server import refusing_port
from tests.support.servers import NginxServer

SUITE = "berth-test"


def make_deb(out: Path, name: str, version: str, depends: str = "") -> Path:
    root = out / f"{name}-{version}"
    (root / "DEBIAN").mkdir(parents=True)
    control = (
        f"Package: {name}\nVersion: {version}\nArchitecture: amd64\n"
        f"Maintainer: Berth tests <tests@localhost>\nDescription: test package {name}\n"
    )
    if depends:
        control += f"Depends: {depends}\n"
    (root / "DEBIAN/control").write_text(control)
    deb = out / f"{name}_{version}_amd64.deb"
    subprocess.run(
        [find_tool("dpkg-deb"), "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)],
        check=True,
        capture_output=True,
        env={**os.environ, "SOURCE_DATE_EPOCH": "0"},
    )
    return deb


def publish(
    repo: Path, debs: list[Path], suite: str = SUITE, valid_until: str | None = None
) -> dict[str, str]:
    """Write a flat Debian repository (dists/<suite>/main/binary-amd64) holding `debs`; return
    each .deb's SHA256 by file name, as the Packages index states it."""
    index = repo / "dists" / suite / "main/binary-amd64"
    index.mkdir(parents=True, exist_ok=True)
    pool = repo / "pool"
    pool.mkdir(exist_ok=True)
    stanzas, sums = [], {}
    for deb in debs:
        (pool / deb.name).write_bytes(deb.read_bytes())
        fields = subprocess.run(
            [find_tool("dpkg-deb"), "-f", str(deb)], check=True, capture_output=True, text=True
        ).stdout.strip()
        digest = hashlib.sha256(deb.read_bytes()).hexdigest()
        sums[deb.name] = digest
        stanzas.append(
            f"{fields}\nFilename: pool/{deb.name}\nSize: {deb.stat().st_size}\nSHA256: {digest}\n"
        )
    packages = "\n".join(stanzas).encode()
    (index / "Packages").write_bytes(packages)
    (index / "Packages.gz").write_bytes(gzip.compress(packages, mtime=0))
    lines = [
        f" {hashlib.sha256(data).hexdigest()} {len(data)} main/binary-amd64/{name}"
        for name, data in (
            ("Packages", packages),
            ("Packages.gz", gzip.compress(packages, mtime=0)),
        )
    ]
    release = (
        f"Suite: {suite}\nCodename: {suite}\nArchitectures: amd64\nComponents: main\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S UTC', time.gmtime())}\n"
        + (f"Valid-Until: {valid_until}\n" if valid_until else "")
        + "SHA256:\n"
        + "\n".join(lines)
        + "\n"
    )
    (repo / "dists" / suite / "Release").write_text(release)
    return sums


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[tuple[Path, NginxServer]]:
    repo = tmp_path / "repo"
    repo.mkdir()
    with NginxServer(repo, tmp_path / "nginx") as server:
        yield repo, server


def source(server: NginxServer) -> str:
    # An unsigned local repository: trusted explicitly, as a local mirror would be signed-by.
    return f"deb [trusted=yes] {server.url} {SUITE} main"


def test_the_answer_names_every_version_and_checksum(
    archive: tuple[Path, NginxServer], tmp_path: Path
) -> None:
    repo, server = archive
    debs = tmp_path / "debs"
    libssl = make_deb(debs, "libssl-test", "3.5.1-1")
    sums = publish(repo, [libssl, make_deb(debs, "app", "1.0", depends="libssl-test")])
    found = resolve(tmp_path / "apt", [source(server)], ["app"])
    assert found.packages == (("app", "1.0", "amd64"), ("libssl-test", "3.5.1-1", "amd64"))
    assert found.sha256[("libssl-test", "3.5.1-1", "amd64")] == sums[libssl.name]
    # Asking again, with nothing published, gives the same answer and digest.
    again = resolve(tmp_path / "apt", [source(server)], ["app"])
    assert again == found and again.digest() == found.digest()
    assert json.loads(json.dumps(found.to_json()))["packages"][0] == ["app", "1.0", "amd64"]


def test_a_fix_published_in_the_archive_changes_the_answer(
    archive: tuple[Path, NginxServer], tmp_path: Path
) -> None:
    repo, server = archive
    debs = tmp_path / "debs"
    app = make_deb(debs, "app", "1.0", depends="libssl-test")
    publish(repo, [make_deb(debs, "libssl-test", "3.5.1-1"), app])
    before = resolve(tmp_path / "apt", [source(server)], ["app"])
    time.sleep(1.1)  # a newer Release Date, as the archive's next publication has
    publish(repo, [make_deb(debs, "libssl-test", "3.5.1-1+deb13u1"), app])
    after = resolve(tmp_path / "apt", [source(server)], ["app"])
    assert after.digest() != before.digest()
    assert ("libssl-test", "3.5.1-1+deb13u1", "amd64") in after.packages
    assert changed_versions(before.packages, after.packages) == [
        "libssl-test 3.5.1-1 → 3.5.1-1+deb13u1"
    ]


def test_the_bootstraps_stub_counts_as_installed(
    archive: tuple[Path, NginxServer], tmp_path: Path
) -> None:
    # The kernel wants an initramfs generator; Berth's stub provides one before apt resolves,
    # so the answer, like the bootstrap, holds no initramfs-tools.
    repo, server = archive
    debs = tmp_path / "debs"
    publish(
        repo,
        [
            make_deb(debs, "kernel-test", "6.12", depends="initramfs-tools | linux-initramfs-tool"),
            make_deb(debs, "initramfs-tools", "0.142"),
        ],
    )
    found = resolve(tmp_path / "apt", [source(server)], ["kernel-test"], installed=stub_status())
    assert found.packages == (("kernel-test", "6.12", "amd64"),)
    without = resolve(tmp_path / "apt2", [source(server)], ["kernel-test"])
    assert ("initramfs-tools", "0.142", "amd64") in without.packages


def test_an_unreachable_archive_is_named(tmp_path: Path) -> None:
    with refusing_port() as port:
        line = f"deb [trusted=yes] http://127.0.0.1:{port}/ {SUITE} main"
        with pytest.raises(ArchiveUnreachable) as error:
            resolve(tmp_path / "apt", [line], ["app"])
    assert f"http://127.0.0.1:{port}/" in str(error.value)
    assert "--offline" in (error.value.hint or "")


def test_packages_the_archive_does_not_have_are_refused(
    archive: tuple[Path, NginxServer], tmp_path: Path
) -> None:
    repo, server = archive
    publish(repo, [make_deb(tmp_path / "debs", "app", "1.0", depends="libmissing")])
    with pytest.raises(BuildError, match="cannot install the image's packages together"):
        resolve(tmp_path / "apt", [source(server)], ["app"])
    with pytest.raises(BuildError, match="nosuchpackage"):
        resolve(tmp_path / "apt", [source(server)], ["nosuchpackage"])


def test_the_hosts_own_package_state_is_never_read_or_written(
    archive: tuple[Path, NginxServer], tmp_path: Path
) -> None:
    repo, server = archive
    publish(repo, [make_deb(tmp_path / "debs", "app", "1.0")])
    lists = Path("/var/lib/apt/lists")
    before = sorted(p.name for p in lists.iterdir()) if lists.is_dir() else []
    found = resolve(tmp_path / "apt", [source(server)], ["app"])
    # The host's installed packages do not count: the build's status holds none of them.
    assert found.packages == (("app", "1.0", "amd64"),)
    assert (sorted(p.name for p in lists.iterdir()) if lists.is_dir() else []) == before


def test_cached_trees_newest_first(tmp_path: Path) -> None:
    for n, name in enumerate(["key-aaaa", "key-bbbb", "other-cccc", "key-noto"]):
        entry = tmp_path / name
        entry.mkdir()
        if name != "key-noto":  # no meta.json: an interrupted bootstrap, never reused
            (entry / "meta.json").write_text("{}")
            os.utime(entry / "meta.json", (1000 + n, 1000 + n))
    assert [e.name for e in cached_trees(tmp_path, "key")] == ["key-bbbb", "key-aaaa"]


def test_changed_versions_lists_added_removed_and_moved() -> None:
    before = [("a", "1", "amd64"), ("b", "1", "all"), ("c", "1", "amd64")]
    after = [("a", "2", "amd64"), ("c", "1", "amd64"), ("d", "0.1", "amd64")]
    assert changed_versions(before, after) == ["a 1 → 2", "+d 0.1", "-b 1"]


def test_offline_uses_the_newest_cached_tree_and_never_asks(tmp_path: Path) -> None:
    from builder.config import load_image
    from builder.rootfs import apt_sources, build_rootfs, cache_key
    from tests.support import REPO

    config = load_image("base", REPO / "images")
    with pytest.raises(BuildError, match="--offline: no cached root tree"):
        build_rootfs(config, tmp_path / "cache", offline=True)
    key = cache_key(config, apt_sources(config))
    for n, versions in enumerate(["old", "new"]):
        entry = tmp_path / "cache/rootfs" / f"{key}-{versions}"
        (entry / "tree").mkdir(parents=True)
        meta = {"kernel_version": "6.12", "packages": [["libc6", versions, "amd64"]], "key": ""}
        (entry / "meta.json").write_text(json.dumps(meta))
        os.utime(entry / "meta.json", (1000 + n, 1000 + n))
    tree = build_rootfs(config, tmp_path / "cache", offline=True)
    assert tree.path == tmp_path / "cache/rootfs" / f"{key}-new/tree"
    assert tree.packages == (("libc6", "new", "amd64"),)
    assert not (tmp_path / "cache/apt").exists()  # the archive was not asked


WHEN = "20261201T000000Z"
EXPIRED = "Tue, 01 Dec 2026 12:00:00 UTC"


def test_a_snapshot_is_read_although_its_release_files_expired(
    archive: tuple[Path, NginxServer], tmp_path: Path
) -> None:
    from builder.config import ImageConfig
    from builder.rootfs import apt_sources

    repo, server = archive
    debs = [make_deb(tmp_path / "debs", "app", "1.0")]
    # The snapshot archive's layout: archive/debian/<when>/ and archive/debian-security/<when>/.
    for base, suite in (
        ("debian", SUITE),
        ("debian", f"{SUITE}-updates"),
        ("debian-security", f"{SUITE}-security"),
    ):
        publish(repo / "archive" / base / WHEN, debs, suite, valid_until=EXPIRED)
    config = ImageConfig(
        name="t", path=tmp_path / "t.toml", suite=SUITE, snapshot=WHEN, snapshot_mirror=server.url
    )
    lines = [s.line() for s in apt_sources(config)]
    assert lines[0] == f"deb [check-valid-until=no] {server.url}archive/debian/{WHEN}/ {SUITE} main"
    assert lines[2].endswith(f"archive/debian-security/{WHEN}/ {SUITE}-security main")
    # Signed, as the snapshot archive is (apt checks Valid-Until only on signed Release files),
    # with a key of this test's own, named by signed-by.
    keyring = sign(repo / "archive", tmp_path / "gnupg")
    signed = [
        line.replace("[check-valid-until=no]", f"[check-valid-until=no signed-by={keyring}]")
        for line in lines
    ]
    assert resolve(tmp_path / "apt", signed, ["app"]).packages == (("app", "1.0", "amd64"),)
    # Signatures still count: another key's keyring makes the archive unreadable.
    other = sign(tmp_path / "unused", tmp_path / "gnupg-other")
    wrong = [line.replace(str(keyring), str(other)) for line in signed]
    with pytest.raises(ArchiveUnreachable, match="cannot ask the package archive"):
        resolve(tmp_path / "apt2", wrong, ["app"])


def sign(archive: Path, home: Path) -> Path:
    """Clear-sign every Release under `archive` as InRelease with a new key; its keyring."""
    home.mkdir(mode=0o700)
    archive.mkdir(parents=True, exist_ok=True)
    gpg = [find_tool("gpg"), "--batch", "--homedir", str(home), "--pinentry-mode", "loopback"]
    subprocess.run(
        [
            *gpg,
            "--passphrase",
            "",
            "--quick-gen-key",
            "berth-test-archive",
            "ed25519",
            "sign",
            "1d",
        ],
        check=True,
        capture_output=True,
    )
    for release in archive.rglob("Release"):
        subprocess.run(
            [*gpg, "--yes", "--clearsign", "-o", str(release.with_name("InRelease")), str(release)],
            check=True,
            capture_output=True,
        )
    keyring = home / "archive.gpg"
    subprocess.run([*gpg, "--export", "-o", str(keyring)], check=True, capture_output=True)
    return keyring


def test_a_snapshot_without_an_archive_address_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from builder.config import ImageConfig
    from builder.rootfs import apt_sources

    monkeypatch.delenv("BERTH_SNAPSHOT_MIRROR", raising=False)
    config = ImageConfig(name="t", path=tmp_path / "t.toml", snapshot=WHEN)
    with pytest.raises(BuildError, match=f"snapshot {WHEN}: no address") as error:
        apt_sources(config)
    assert "snapshot_mirror" in (error.value.hint or "")
    monkeypatch.setenv("BERTH_SNAPSHOT_MIRROR", "http://snapshots.example/")
    assert apt_sources(config)[0].uri == f"http://snapshots.example/archive/debian/{WHEN}/"
