"""Publishing into a static TUF repository: keys, layout, channels, pulls, pins, refresh."""

from __future__ import annotations

import json
import shutil
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from builder import publish as pub
from builder.lock import exclusive
from builder.publish import PublishError
from tests.support.releases import make_release, roothash_of
from updater.release import channel as ch
from updater.release.version import Version

NOW = datetime(2025, 11, 22, 8, 0, tzinfo=UTC)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    keys_dir = tmp_path / "keys"
    pub.init_keys(keys_dir, now=NOW)
    return keys_dir


def files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def flip_first_byte(path: Path) -> None:
    # Inverted, not overwritten with a fixed byte: random content starts with that byte 1 in 256.
    data = path.read_bytes()
    path.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])


def test_init_keys_layout_and_modes(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    pub.init_keys(keys_dir, root_threshold=2, root_keys=3, now=NOW)
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    pems = sorted(p.name for p in keys_dir.glob("*.pem"))
    assert pems == [
        "root-1.pem",
        "root-2.pem",
        "root-3.pem",
        "snapshot.pem",
        "targets.pem",
        "timestamp.pem",
    ]
    assert all(stat.S_IMODE((keys_dir / p).stat().st_mode) == 0o600 for p in pems)
    root = Metadata[Root].from_file(str(keys_dir / "root.json"))
    assert (keys_dir / "1.root.json").read_bytes() == (keys_dir / "root.json").read_bytes()
    root.verify_delegate(Root.type, root)
    assert root.signed.consistent_snapshot
    assert root.signed.roles[Root.type].threshold == 2
    assert len(root.signed.roles[Root.type].keyids) == 3
    assert len(root.signatures) == 3
    assert root.signed.expires == NOW + timedelta(days=365)


def test_init_keys_never_overwrites(keys: Path) -> None:
    before = files(keys)
    with pytest.raises(PublishError, match="already holds keys"):
        pub.init_keys(keys)
    assert files(keys) == before


def test_init_keys_threshold_must_be_reachable(tmp_path: Path) -> None:
    with pytest.raises(PublishError, match="cannot be met"):
        pub.init_keys(tmp_path / "keys", root_threshold=2, root_keys=1)
    assert not (tmp_path / "keys").exists()


def test_publish_layout_and_channel(tmp_path: Path, keys: Path) -> None:
    release = make_release(tmp_path / "out", "1.2.3")
    repo = tmp_path / "repo"
    result = pub.publish(release, repo, keys, "stable", now=NOW)
    assert result.changed
    assert (result.targets_version, result.snapshot_version, result.timestamp_version) == (1, 1, 1)
    assert result.expires[Timestamp.type] == NOW + timedelta(days=1)
    assert result.expires[Targets.type] == NOW + timedelta(days=14)

    names = set(files(repo))
    assert {
        "metadata/root.json",
        "metadata/1.root.json",
        "metadata/timestamp.json",
        "metadata/1.snapshot.json",
        "metadata/1.targets.json",
    } <= names
    targets = Metadata[Targets].from_file(str(repo / "metadata/1.targets.json")).signed
    for name in ("root.erofs", "root.verity", "uki.efi", "manifest.json"):
        info = targets.targets[f"containerhost/1.2.3/{name}"]
        stored = repo / "targets/containerhost/1.2.3" / f"{info.hashes['sha256']}.{name}"
        assert stored.read_bytes() == (release / name).read_bytes()
    # No temporary files left behind.
    assert not [n for n in names if "/." in n]

    manifest = pub.read_channel(repo, keys, "stable")
    (rel,) = manifest.releases
    assert rel.version == Version.parse("1.2.3")
    assert rel.roothash == roothash_of(release)
    assert rel.waves == ch.default_waves(NOW)
    assert rel.targets["uki.efi"] == "containerhost/1.2.3/uki.efi"


def test_publish_is_idempotent(tmp_path: Path, keys: Path) -> None:
    release = make_release(tmp_path / "out", "1.2.3")
    repo = tmp_path / "repo"
    pub.publish(release, repo, keys, "stable", now=NOW)
    before = files(repo)
    # Later, without --now: the release keeps its original waves and nothing is re-signed.
    again = pub.publish(release, repo, keys, "stable", now=NOW + timedelta(hours=5))
    assert not again.changed
    assert again.targets_version == 1
    assert files(repo) == before


def test_publish_now_reopens_waves(tmp_path: Path, keys: Path) -> None:
    release = make_release(tmp_path / "out", "1.2.3")
    repo = tmp_path / "repo"
    pub.publish(release, repo, keys, "stable", now=NOW)
    later = NOW + timedelta(hours=1)
    result = pub.publish(release, repo, keys, "stable", now=later, immediate=True)
    assert result.changed and result.targets_version == 2
    (rel,) = pub.read_channel(repo, keys, "stable").releases
    assert rel.waves == ch.immediate_waves(later)


def test_second_release_and_second_channel_share_payload(tmp_path: Path, keys: Path) -> None:
    repo = tmp_path / "repo"
    first = make_release(tmp_path / "out", "1.2.3")
    second = make_release(tmp_path / "out", "1.3.0")
    pub.publish(first, repo, keys, "stable", now=NOW)
    pub.publish(second, repo, keys, "stable", now=NOW)
    pub.publish(second, repo, keys, "beta", now=NOW, max_version=Version.parse("1.9.0"))
    stable = pub.read_channel(repo, keys, "stable")
    beta = pub.read_channel(repo, keys, "beta")
    assert [str(r.version) for r in stable.releases] == ["1.2.3", "1.3.0"]
    assert [str(r.version) for r in beta.releases] == ["1.3.0"]
    assert beta.max_version == Version.parse("1.9.0") and stable.max_version is None
    assert len(list((repo / "targets/containerhost/1.3.0").glob("*.root.erofs"))) == 1


def test_same_version_other_build_is_refused(tmp_path: Path, keys: Path) -> None:
    repo = tmp_path / "repo"
    pub.publish(make_release(tmp_path / "a", "1.2.3"), repo, keys, "stable", now=NOW)
    before = files(repo)
    with pytest.raises(PublishError, match="already published with other content") as error:
        pub.publish(make_release(tmp_path / "b", "1.2.3"), repo, keys, "stable", now=NOW)
    assert error.value.hint is not None and "immutable" in error.value.hint
    # Nothing was added: not even an unreferenced payload copy.
    assert files(repo) == before


def test_tampered_payload_is_refused_naming_the_file(tmp_path: Path, keys: Path) -> None:
    release = make_release(tmp_path / "out", "1.2.3")
    flip_first_byte(release / "root.verity")
    with pytest.raises(PublishError, match=r"root\.verity does not match the release manifest"):
        pub.publish(release, tmp_path / "repo", keys, "stable", now=NOW)
    assert not (tmp_path / "repo/metadata/timestamp.json").exists()


def test_missing_or_malformed_manifest_is_refused(tmp_path: Path, keys: Path) -> None:
    release = make_release(tmp_path / "out", "1.2.3")
    (release / "uki.efi").unlink()
    with pytest.raises(PublishError, match=r"uki\.efi is missing"):
        pub.publish(release, tmp_path / "repo", keys, "stable", now=NOW)
    doc = json.loads((release / "manifest.json").read_text())
    doc["roothash"] = "nope"
    (release / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(PublishError, match=r"manifest\.json: field 'roothash'"):
        pub.publish(release, tmp_path / "repo", keys, "stable", now=NOW)
    (release / "manifest.json").unlink()
    with pytest.raises(PublishError, match=r"manifest\.json is missing"):
        pub.publish(release, tmp_path / "repo", keys, "stable", now=NOW)


def test_bad_channel_name_is_refused(tmp_path: Path, keys: Path) -> None:
    release = make_release(tmp_path / "out", "1.2.3")
    with pytest.raises(PublishError, match=r"channel name '\.\./x' is not usable"):
        pub.publish(release, tmp_path / "repo", keys, "../x", now=NOW)


def candidate(repo: Path, keys: Path, booted: str = "1.0.0") -> ch.Selection:
    return ch.select_candidate(
        pub.read_channel(repo, keys, "stable"),
        image="containerhost",
        arch="x86_64",
        booted=Version.parse(booted),
        seed=2000,
        now=NOW + timedelta(days=2),
    )


def test_pull_hides_release_and_undo_restores_it(tmp_path: Path, keys: Path) -> None:
    repo = tmp_path / "repo"
    pub.publish(make_release(tmp_path / "out", "1.2.3"), repo, keys, "stable", now=NOW)
    pub.publish(make_release(tmp_path / "out", "1.3.0"), repo, keys, "stable", now=NOW)
    assert str(getattr(candidate(repo, keys).release, "version", None)) == "1.3.0"

    result = pub.pull(repo, keys, "stable", Version.parse("1.3.0"), now=NOW)
    assert result.changed and result.targets_version == 3
    selection = candidate(repo, keys)
    assert selection.release is not None and str(selection.release.version) == "1.2.3"
    assert selection.reasons == ("1.3.0: pulled",)
    # Pulling twice changes nothing; republishing does not un-pull.
    assert not pub.pull(repo, keys, "stable", Version.parse("1.3.0"), now=NOW).changed
    pub.publish(make_release(tmp_path / "again", "1.4.0"), repo, keys, "stable", now=NOW)
    assert pub.read_channel(repo, keys, "stable").releases[1].pulled

    pub.pull(repo, keys, "stable", Version.parse("1.3.0"), undo=True, now=NOW)
    assert not pub.read_channel(repo, keys, "stable").releases[1].pulled

    with pytest.raises(PublishError, match=r"no release 9\.9\.9 in channel stable"):
        pub.pull(repo, keys, "stable", Version.parse("9.9.9"), now=NOW)
    with pytest.raises(PublishError, match="channel beta does not exist"):
        pub.pull(repo, keys, "beta", Version.parse("1.3.0"), now=NOW)


def test_max_version_pins_and_unpins(tmp_path: Path, keys: Path) -> None:
    repo = tmp_path / "repo"
    pub.publish(make_release(tmp_path / "out", "1.2.3"), repo, keys, "stable", now=NOW)
    pub.publish(make_release(tmp_path / "out", "1.3.0"), repo, keys, "stable", now=NOW)
    pub.set_max_version(repo, keys, "stable", Version.parse("1.2.9"), now=NOW)
    selection = candidate(repo, keys)
    assert selection.release is not None and str(selection.release.version) == "1.2.3"
    assert selection.reasons == ("1.3.0: above max_version 1.2.9",)
    pub.set_max_version(repo, keys, "stable", None, now=NOW)
    selection = candidate(repo, keys)
    assert selection.release is not None and str(selection.release.version) == "1.3.0"


def test_refresh_resigns_with_new_versions_and_expiry(tmp_path: Path, keys: Path) -> None:
    repo = tmp_path / "repo"
    pub.publish(make_release(tmp_path / "out", "1.2.3"), repo, keys, "stable", now=NOW)
    later = NOW + timedelta(days=10)
    result = pub.refresh(repo, keys, now=later)
    assert (result.targets_version, result.snapshot_version, result.timestamp_version) == (2, 2, 2)
    assert result.expires[Timestamp.type] == later + timedelta(days=1)
    assert result.expires[Snapshot.type] == later + timedelta(days=14)
    snapshot = Metadata[Snapshot].from_file(str(repo / "metadata/2.snapshot.json")).signed
    assert snapshot.meta["targets.json"].version == 2
    # The channel content is unchanged, only signatures and expiry moved.
    assert len(pub.read_channel(repo, keys, "stable").releases) == 1


def test_timestamp_refresh_needs_only_the_timestamp_key(tmp_path: Path, keys: Path) -> None:
    repo = tmp_path / "repo"
    pub.publish(make_release(tmp_path / "out", "1.2.3"), repo, keys, "stable", now=NOW)
    signing_host = tmp_path / "signing-host"
    signing_host.mkdir(mode=0o700)
    for name in ("root.json", "1.root.json", "timestamp.pem"):
        shutil.copy2(keys / name, signing_host / name)
    result = pub.refresh(repo, signing_host, now=NOW, timestamp_only=True)
    assert (result.targets_version, result.snapshot_version, result.timestamp_version) == (1, 1, 2)
    with pytest.raises(PublishError, match=r"the targets private key .* is missing"):
        pub.refresh(repo, signing_host, now=NOW)


def test_publish_without_root_key(tmp_path: Path, keys: Path) -> None:
    # The root key goes offline after init; publishing must not need it.
    (keys / "root-1.pem").unlink()
    result = pub.publish(make_release(tmp_path / "out", "1.2.3"), tmp_path / "repo", keys, "stable")
    assert result.changed


def test_publisher_refuses_tampered_repository(tmp_path: Path, keys: Path) -> None:
    repo = tmp_path / "repo"
    pub.publish(make_release(tmp_path / "out", "1.2.3"), repo, keys, "stable", now=NOW)
    path = repo / "metadata/1.targets.json"
    doc = json.loads(path.read_text())
    doc["signed"]["targets"].pop("containerhost/1.2.3/uki.efi")
    path.write_text(json.dumps(doc))
    with pytest.raises(PublishError, match=r"1\.targets\.json: signature does not verify"):
        pub.publish(make_release(tmp_path / "out", "1.3.0"), repo, keys, "stable", now=NOW)


def test_repository_of_other_keys_is_refused(tmp_path: Path, keys: Path) -> None:
    repo = tmp_path / "repo"
    pub.publish(make_release(tmp_path / "out", "1.2.3"), repo, keys, "stable", now=NOW)
    other = tmp_path / "other-keys"
    pub.init_keys(other, now=NOW)
    with pytest.raises(PublishError, match=r"1\.root\.json differs from") as error:
        pub.publish(make_release(tmp_path / "out", "1.3.0"), repo, other, "stable", now=NOW)
    assert error.value.hint is not None and "another keys directory" in error.value.hint


def test_rotate_online_key(tmp_path: Path, keys: Path) -> None:
    repo = tmp_path / "repo"
    pub.publish(make_release(tmp_path / "out", "1.2.3"), repo, keys, "stable", now=NOW)
    old_keyids = Metadata[Root].from_file(str(keys / "root.json")).signed.roles["targets"].keyids
    pub.rotate_key(keys, "targets", now=NOW)
    root = Metadata[Root].from_file(str(keys / "root.json"))
    assert root.signed.version == 2
    assert root.signed.roles["targets"].keyids != old_keyids
    assert list(keys.glob("targets.*.retired.pem"))
    result = pub.refresh(repo, keys, now=NOW)
    assert (repo / "metadata/2.root.json").read_bytes() == (keys / "2.root.json").read_bytes()
    targets = Metadata[Targets].from_file(
        str(repo / f"metadata/{result.targets_version}.targets.json")
    )
    root.verify_delegate(Targets.type, targets)


def test_rotate_root_key_is_signed_by_old_and_new(tmp_path: Path, keys: Path) -> None:
    old = Metadata[Root].from_file(str(keys / "root.json"))
    pub.rotate_key(keys, "root", now=NOW)
    new = Metadata[Root].from_file(str(keys / "2.root.json"))
    # What a client does: the old root must accept the new one, and the new one itself.
    old.verify_delegate(Root.type, new)
    new.verify_delegate(Root.type, new)
    assert new.signed.roles[Root.type].keyids != old.signed.roles[Root.type].keyids


def test_a_payload_that_fails_its_check_is_not_left_in_the_repository(
    tmp_path: Path, keys: Path
) -> None:
    release = make_release(tmp_path / "out", "1.2.3")
    flip_first_byte(release / "uki.efi")
    repo = tmp_path / "repo"
    with pytest.raises(PublishError, match=r"uki\.efi does not match the release manifest"):
        pub.publish(release, repo, keys, "stable", now=NOW)
    # Neither the copy under its final name nor a temporary file: the check came before the rename.
    assert not [p for p in repo.rglob("*") if "uki.efi" in p.name]


def test_the_repository_lock_is_the_directory_so_nothing_extra_is_served(
    tmp_path: Path, keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    results: list[pub.PublishResult] = []
    release = make_release(tmp_path / "out", "1.2.3")
    publisher = threading.Thread(
        target=lambda: results.append(pub.publish(release, repo, keys, "stable", now=NOW))
    )
    with exclusive(repo):
        publisher.start()
        publisher.join(timeout=1.0)
        assert publisher.is_alive() and not results  # waits for the lock's holder
    publisher.join(timeout=30)
    assert results and results[0].changed
    assert "waiting for another publisher to finish" in capsys.readouterr().err
    assert sorted(p.name for p in repo.iterdir()) == ["metadata", "targets"]
