"""The agent's TUF client against a repository published by our own code and served by nginx.

Each refusal gets its own test and must end in our error class with a message that says what was
refused and why.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests

from builder import publish as pub
from tests.support.misbehaving_server import refusing_port
from tests.support.releases import make_release
from tests.support.servers import NginxServer
from updater.release.version import Version
from updater.update import trust
from updater.update.trust import TrustedRepository


class Site:
    """Keys, a repository published into `served`, and nginx serving it."""

    def __init__(self, base: Path, server: NginxServer) -> None:
        self.base = base
        self.keys = base / "keys"
        self.served = base / "served"
        self.server = server
        self.count = 0

    def publish(self, version: str, now: datetime | None = None) -> Path:
        release = make_release(self.base / f"out{self.count}", version)
        self.count += 1
        pub.publish(release, self.served, self.keys, "stable", now=now)
        return release

    def snapshot_state(self, name: str) -> Path:
        copy = self.base / name
        shutil.copytree(self.served, copy)
        return copy

    def serve_state(self, state: Path) -> None:
        # nginx resolves paths per request: swapping the directory's content swaps the repository.
        shutil.rmtree(self.served)
        shutil.copytree(state, self.served)

    def client(self, name: str = "client") -> TrustedRepository:
        return TrustedRepository(
            self.base / name / "metadata",
            self.keys / "root.json",
            self.server.url + "metadata/",
            self.server.url + "targets/",
        )


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    pub.init_keys(tmp_path / "keys")
    (tmp_path / "served").mkdir()
    with NginxServer(tmp_path / "served", tmp_path / "nginx") as server:
        yield Site(tmp_path, server)


def test_refresh_channel_and_target_info(site: Site) -> None:
    release = site.publish("1.2.3")
    repo = site.client()
    repo.refresh()
    manifest = repo.channel("stable")
    (rel,) = manifest.releases
    assert rel.version == Version.parse("1.2.3")

    info = repo.target_info(rel.targets["root.erofs"])
    payload = (release / "root.erofs").read_bytes()
    assert info.length == len(payload)
    assert info.sha256 == hashlib.sha256(payload).hexdigest()
    assert info.url == f"{site.server.url}targets/containerhost/1.2.3/{info.sha256}.root.erofs"
    # target_info fetched no payload; the URL serves exactly the signed bytes.
    assert not [r for r in site.server.requests() if "root.erofs" in r.path]
    assert requests.get(info.url, timeout=10).content == payload

    # The trusted root was seeded into the cache, and the verified metadata persisted there.
    cache = site.base / "client/metadata"
    assert {"root.json", "timestamp.json", "snapshot.json", "targets.json"} <= {
        p.name for p in cache.iterdir()
    }


def test_second_check_sees_new_release(site: Site) -> None:
    site.publish("1.2.3")
    repo = site.client()
    assert len(repo.channel("stable").releases) == 1
    site.publish("1.3.0")
    repo.refresh()
    assert [str(r.version) for r in repo.channel("stable").releases] == ["1.2.3", "1.3.0"]


def test_unknown_target(site: Site) -> None:
    site.publish("1.2.3")
    with pytest.raises(
        trust.TargetNotFound, match=r"lists no target containerhost/9\.9\.9/uki\.efi"
    ):
        site.client().target_info("containerhost/9.9.9/uki.efi")


def test_bad_signature(site: Site) -> None:
    site.publish("1.2.3")
    path = site.served / "metadata/timestamp.json"
    doc = json.loads(path.read_text())
    doc["signed"]["expires"] = "2099-01-01T00:00:00Z"  # a freeze attacker's wish
    path.write_text(json.dumps(doc))
    with pytest.raises(trust.BadSignature, match=r"refused repository metadata .*signature"):
        site.client().refresh()


def test_expired_timestamp(site: Site) -> None:
    site.publish("1.2.3", now=datetime.now(UTC) - timedelta(days=3))
    with pytest.raises(trust.MetadataExpired, match=r"timestamp\.json is expired"):
        site.client().refresh()


def test_rollback_to_older_metadata(site: Site) -> None:
    site.publish("1.2.3")
    old = site.snapshot_state("state-1")
    site.publish("1.3.0")
    repo = site.client()
    repo.refresh()  # this machine has now seen timestamp version 2
    site.serve_state(old)
    with pytest.raises(trust.RollbackRefused, match=r"timestamp version 1 must be >= 2.*rollback"):
        repo.refresh()
    # A machine that never saw the newer state accepts the old one: the refusal is about history.
    site.client("fresh").refresh()


def test_mix_and_match(site: Site) -> None:
    site.publish("1.2.3")
    old_targets = (site.served / "metadata/1.targets.json").read_bytes()
    site.publish("1.3.0")
    # The current timestamp and snapshot, with the targets metadata of the earlier state in the
    # place the snapshot points to: both are validly signed, the combination is not.
    (site.served / "metadata/2.targets.json").write_bytes(old_targets)
    with pytest.raises(trust.MetadataMismatch, match="mixed repository states"):
        site.client().refresh()


def channel_file(site: Site) -> Path:
    (path,) = (site.served / "targets/channels").glob("*.stable.json")
    return path


def test_channel_document_with_other_hash(site: Site) -> None:
    site.publish("1.2.3")
    path = channel_file(site)
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"pulled": false', b'"pulled": true '))  # same length
    with pytest.raises(trust.TargetMismatch, match=r"refused target channels/stable\.json"):
        site.client().channel("stable")


def test_channel_document_longer_than_signed(site: Site) -> None:
    site.publish("1.2.3")
    path = channel_file(site)
    path.write_bytes(path.read_bytes() + b" " * 1000)
    with pytest.raises(trust.TargetMismatch, match="longer than its signed length"):
        site.client().channel("stable")


def test_http_error(site: Site) -> None:
    # Nothing published: the timestamp is a 404.
    with pytest.raises(trust.RepositoryUnreachable, match="HTTP status 404"):
        site.client().refresh()


def test_connection_refused(site: Site) -> None:
    with refusing_port() as port:
        repo = TrustedRepository(
            site.base / "c/metadata",
            site.keys / "root.json",
            f"http://127.0.0.1:{port}/metadata/",
            f"http://127.0.0.1:{port}/targets/",
        )
        with pytest.raises(trust.RepositoryUnreachable, match="cannot fetch repository metadata"):
            repo.refresh()


def test_root_rotation_is_followed(site: Site) -> None:
    site.publish("1.2.3")
    embedded = site.base / "image-root.json"
    shutil.copy2(site.keys / "root.json", embedded)  # what an older image ships
    pub.rotate_key(site.keys, "timestamp")
    pub.rotate_key(site.keys, "root")
    pub.refresh(site.served, site.keys)
    repo = TrustedRepository(
        site.base / "old-image/metadata",
        embedded,
        site.server.url + "metadata/",
        site.server.url + "targets/",
    )
    repo.refresh()
    assert len(repo.channel("stable").releases) == 1
    cached = json.loads((site.base / "old-image/metadata/root.json").read_text())
    assert cached["signed"]["version"] == 3
    # The image's older root does not replace the newer root the machine has verified since.
    repo.refresh()
    assert json.loads((site.base / "old-image/metadata/root.json").read_text()) == cached


def test_missing_trusted_root(site: Site, tmp_path: Path) -> None:
    repo = TrustedRepository(
        tmp_path / "m", tmp_path / "absent.json", site.server.url, site.server.url
    )
    with pytest.raises(trust.TrustError, match=r"absent\.json is missing or unreadable"):
        repo.refresh()
