"""Publishing releases into a static TUF repository, with python-tuf's Metadata API.

The keys directory (`keys/` by default, never in git):

    root.json, 1.root.json, 2.root.json ...   public root metadata; root.json is the newest and is
                                              what an image embeds as its trust anchor
    root-1.pem ... root-N.pem                 root private keys: needed only by `init_keys` and
                                              `rotate_key`; keep them offline after init
    targets.pem, snapshot.pem, timestamp.pem  online keys: every publish needs them

The repository is plain static files that any web server, object store or CDN can serve:

    metadata/root.json, metadata/<N>.root.json
    metadata/timestamp.json
    metadata/<N>.snapshot.json, metadata/<N>.targets.json
    targets/<dir>/<sha256>.<name>             consistent snapshots: a file name never changes
                                              content, so mirrors and caches can never serve a
                                              half-updated release

Files are written under temporary names and renamed, payload first and `timestamp.json` last: until
the timestamp is replaced, clients see the previous repository state in full.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, Signer, SSlibKey
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from builder.errors import BuildError
from builder.lock import exclusive
from updater.files import atomic_writer, fsync_dir, write_file_atomic
from updater.release import channel as channels
from updater.release.channel import ChannelError, ChannelManifest, Release
from updater.release.manifest import PAYLOAD_FILES, FileEntry, Manifest, ManifestError, hash_file
from updater.release.version import Version

ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
ONLINE_ROLES = (Targets.type, Snapshot.type, Timestamp.type)
EXPIRY: Mapping[str, timedelta] = MappingProxyType(
    {
        Root.type: timedelta(days=365),
        Targets.type: timedelta(days=14),
        Snapshot.type: timedelta(days=14),
        Timestamp.type: timedelta(days=1),
    }
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SERIALIZER = JSONSerializer(compact=False)


class PublishError(BuildError):
    """A release cannot be published, or the keys or repository are not in a usable state."""


@dataclass(frozen=True)
class PublishResult:
    """What a publishing operation left in the repository."""

    changed: bool  # False when the repository already held exactly this content
    targets_version: int
    snapshot_version: int
    timestamp_version: int
    expires: Mapping[str, datetime]  # role -> expiry of the metadata now in the repository


def _now(now: datetime | None) -> datetime:
    when = now if now is not None else datetime.now(UTC)
    if when.tzinfo is None:
        raise ValueError("now must carry a time zone")
    return when.astimezone(UTC).replace(microsecond=0)


# ---------------------------------------------------------------------------------------------
# Keys


def root_key_path(keys_dir: Path, index: int) -> Path:
    return keys_dir / f"root-{index}.pem"


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: a key file is never overwritten, not even by a race with a second `keys init`.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)


def init_keys(
    keys_dir: Path,
    root_threshold: int = 1,
    root_keys: int = 1,
    *,
    now: datetime | None = None,
) -> None:
    """Create ed25519 keys for every role and the first signed root metadata (the trust anchor)."""
    if not 1 <= root_threshold <= root_keys:
        raise PublishError(
            f"root threshold {root_threshold} with {root_keys} root key(s) cannot be met",
            hint="the threshold must be between 1 and the number of root keys",
        )
    existing = [p.name for p in _key_dir_files(keys_dir)]
    if existing:
        raise PublishError(
            f"{keys_dir} already holds keys or metadata ({', '.join(sorted(existing))})",
            hint="keys are never overwritten; choose another directory or rotate a key instead",
        )
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys_dir.chmod(0o700)
    when = _now(now)

    root = Root(expires=when + EXPIRY[Root.type], consistent_snapshot=True)
    root_signers = [CryptoSigner.generate_ed25519() for _ in range(root_keys)]
    for signer in root_signers:
        root.add_key(signer.public_key, Root.type)
    root.roles[Root.type].threshold = root_threshold
    online = {role: CryptoSigner.generate_ed25519() for role in ONLINE_ROLES}
    for role, signer in online.items():
        root.add_key(signer.public_key, role)

    for index, signer in enumerate(root_signers, start=1):
        _write_new(root_key_path(keys_dir, index), signer.private_bytes, 0o600)
    for role, signer in online.items():
        _write_new(keys_dir / f"{role}.pem", signer.private_bytes, 0o600)

    metadata = Metadata(root)
    for signer in root_signers:
        metadata.sign(signer, append=True)
    data = metadata.to_bytes(_SERIALIZER)
    _write_new(keys_dir / "1.root.json", data, 0o644)
    _write_new(keys_dir / "root.json", data, 0o644)


def _key_dir_files(keys_dir: Path) -> list[Path]:
    if not keys_dir.exists():
        return []
    return [
        p
        for p in keys_dir.iterdir()
        if p.suffix == ".pem" or p.name == "root.json" or p.name.endswith(".root.json")
    ]


def load_trusted_root(keys_dir: Path) -> Metadata[Root]:
    """The newest root metadata of a keys directory, checked to be signed by its own threshold."""
    path = keys_dir / "root.json"
    if not path.exists():
        raise PublishError(
            f"{path} does not exist",
            hint=f"create keys with `./build.py keys init --keys {keys_dir}`",
        )
    try:
        root: Metadata[Root] = Metadata[Root].from_file(str(path))
        root.verify_delegate(Root.type, root)
    except UnsignedMetadataError as e:
        raise PublishError(f"{path}: not signed by its own root keys: {e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise PublishError(f"{path}: not valid root metadata: {e}") from None
    if not isinstance(root.signed, Root):
        raise PublishError(f"{path}: expected root metadata, found {root.signed.type}")
    versioned = keys_dir / f"{root.signed.version}.root.json"
    if not versioned.exists() or versioned.read_bytes() != path.read_bytes():
        raise PublishError(
            f"{versioned} is missing or differs from {path}",
            hint="root.json must be a copy of the newest <N>.root.json; restore it from a backup",
        )
    return root


def _load_signer(keys_dir: Path, root: Root, role: str, path: Path | None = None) -> Signer:
    key_path = path if path is not None else keys_dir / f"{role}.pem"
    try:
        private = load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError:
        raise PublishError(
            f"the {role} private key {key_path} is missing",
            hint=(
                "root keys are only needed for init and rotation; bring them back from offline "
                "storage"
                if role == Root.type
                else f"publishing needs the {role} key in {keys_dir}"
            ),
        ) from None
    except ValueError as e:
        raise PublishError(f"{key_path}: not a PEM private key: {e}") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise PublishError(f"{key_path}: expected an ed25519 key")
    public = SSlibKey.from_crypto(private.public_key(), scheme="ed25519")
    if public.keyid not in root.roles[role].keyids:
        raise PublishError(
            f"{key_path} is not a {role} key of root version {root.version}",
            hint="the key was rotated out, or the file belongs to another keys directory",
        )
    return CryptoSigner(private, root.keys[public.keyid])


def _root_signers(keys_dir: Path, root: Root) -> list[Signer]:
    signers = [
        _load_signer(keys_dir, root, Root.type, path)
        for path in sorted(keys_dir.glob("root-*.pem"))
    ]
    if len(signers) < root.roles[Root.type].threshold:
        raise PublishError(
            f"{len(signers)} root key(s) in {keys_dir}, root threshold is "
            f"{root.roles[Root.type].threshold}",
            hint="bring the root keys back from offline storage (root-*.pem)",
        )
    return signers


def rotate_key(keys_dir: Path, role: str, *, now: datetime | None = None) -> None:
    """Replace `role`'s key with a new one and sign a new root version.

    Needs the root keys. The retired private key stays as `<role>.<keyid prefix>.retired.pem`.
    For root itself, the new root version is signed by the old and the new root keys, so machines
    that trust the old root accept it. Publish or refresh afterwards: that copies the new root
    metadata into the repository and re-signs with the new key.
    """
    if role not in ROLES:
        raise PublishError(f"unknown role {role!r}", hint=f"one of {', '.join(ROLES)}")
    when = _now(now)
    current = load_trusted_root(keys_dir)
    old_root_signers = _root_signers(keys_dir, current.signed)
    new = Metadata[Root].from_bytes(current.to_bytes())
    root = new.signed
    new_signer = CryptoSigner.generate_ed25519()

    if role == Root.type:
        # Replace one root key (the first file): the threshold is unchanged.
        old_path = sorted(keys_dir.glob("root-*.pem"))[0]
        old_keyid = old_root_signers[0].public_key.keyid
        root.revoke_key(old_keyid, Root.type)
        root.add_key(new_signer.public_key, Root.type)
        retired = keys_dir / f"root.{old_keyid[:12]}.retired.pem"
        new_path = old_path
    else:
        old_path = keys_dir / f"{role}.pem"
        old_keyids = list(root.roles[role].keyids)
        for keyid in old_keyids:
            root.revoke_key(keyid, role)
        root.add_key(new_signer.public_key, role)
        retired = keys_dir / f"{role}.{old_keyids[0][:12]}.retired.pem"
        new_path = old_path

    root.version += 1
    root.expires = when + EXPIRY[Root.type]
    new.signatures.clear()
    signers = list(old_root_signers)
    if role == Root.type:
        signers.append(new_signer)
    for signer in signers:
        new.sign(signer, append=True)
    data = new.to_bytes(_SERIALIZER)

    if old_path.exists():
        os.rename(old_path, retired)
    _write_new(new_path, new_signer.private_bytes, 0o600)
    _write_new(keys_dir / f"{root.version}.root.json", data, 0o644)
    write_file_atomic(keys_dir / "root.json", data)


def renew_root(keys_dir: Path, *, now: datetime | None = None) -> None:
    """Sign a new root version with a fresh expiry and the same keys (needs the root keys)."""
    when = _now(now)
    current = load_trusted_root(keys_dir)
    signers = _root_signers(keys_dir, current.signed)
    new = Metadata[Root].from_bytes(current.to_bytes())
    new.signed.version += 1
    new.signed.expires = when + EXPIRY[Root.type]
    new.signatures.clear()
    for signer in signers:
        new.sign(signer, append=True)
    data = new.to_bytes(_SERIALIZER)
    _write_new(keys_dir / f"{new.signed.version}.root.json", data, 0o644)
    write_file_atomic(keys_dir / "root.json", data)


# ---------------------------------------------------------------------------------------------
# Repository state


def _store(path: Path, data: bytes) -> None:
    """Write a repository file atomically (readers see the old file or the new one, never half),
    creating its directory on first use."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, data)


@contextlib.contextmanager
def _locked(repo: Path) -> Iterator[None]:
    # Two publishers at once would both sign version N+1 of different content. The lock is the
    # directory itself: a lock file inside the repository would be served with it.
    repo.mkdir(parents=True, exist_ok=True)
    with exclusive(repo, "another publisher"):
        yield


@dataclass
class _State:
    """The repository's current metadata, loaded and verified; mutated, then committed."""

    repo: Path
    root: Metadata[Root]
    targets: Metadata[Targets]
    snapshot: Metadata[Snapshot]
    timestamp: Metadata[Timestamp]
    fresh: bool = False  # nothing published yet: the first commit writes version 1 of each role

    def bump(self, md: Metadata[Any]) -> None:
        if not self.fresh:
            md.signed.version += 1

    @property
    def metadata_dir(self) -> Path:
        return self.repo / "metadata"


def _read_metadata(path: Path) -> Metadata[Any]:
    try:
        return Metadata.from_file(str(path))
    except FileNotFoundError:
        raise PublishError(f"{path} is missing: the repository is incomplete") from None
    except Exception as e:  # python-tuf raises DeserializationError with varied causes
        raise PublishError(f"{path}: not valid TUF metadata: {e}") from None


def _verified(
    root: Metadata[Root], role: str, path: Path, expected_version: int | None = None
) -> Metadata[Any]:
    md = _read_metadata(path)
    if md.signed.type != role:
        raise PublishError(f"{path}: expected {role} metadata, found {md.signed.type}")
    try:
        root.verify_delegate(role, md)
    except UnsignedMetadataError:
        # Re-signing unverified content would launder whatever was changed on disk.
        raise PublishError(
            f"{path}: signature does not verify with root version {root.signed.version}",
            hint="the repository was changed outside of berth or signed with other keys",
        ) from None
    if expected_version is not None and md.signed.version != expected_version:
        raise PublishError(
            f"{path}: version {md.signed.version}, the role above it lists {expected_version}"
        )
    return md


def _load_state(repo: Path, keys_root: Metadata[Root], now: datetime) -> _State:
    metadata = repo / "metadata"
    repo_root_path = metadata / "root.json"
    if not (metadata / "timestamp.json").exists():
        if any(metadata.glob("*.json")):
            raise PublishError(
                f"{metadata} has metadata but no timestamp.json: not a complete repository"
            )
        return _State(
            repo,
            keys_root,
            Metadata(Targets(expires=now)),
            Metadata(Snapshot(expires=now)),
            Metadata(Timestamp(expires=now)),
            fresh=True,
        )
    repo_root = _read_metadata(repo_root_path)
    if not isinstance(repo_root.signed, Root):
        raise PublishError(f"{repo_root_path}: expected root metadata")
    root_md: Metadata[Root] = repo_root
    timestamp = _verified(root_md, Timestamp.type, metadata / "timestamp.json")
    snap_version = timestamp.signed.snapshot_meta.version
    snapshot = _verified(
        root_md, Snapshot.type, metadata / f"{snap_version}.snapshot.json", snap_version
    )
    targets_version = snapshot.signed.meta["targets.json"].version
    targets = _verified(
        root_md, Targets.type, metadata / f"{targets_version}.targets.json", targets_version
    )
    return _State(repo, root_md, targets, snapshot, timestamp)


def _sync_root(state: _State, keys_dir: Path, keys_root: Metadata[Root]) -> bool:
    """Copy root versions the repository lacks from the keys directory; True if any were added."""
    metadata = state.metadata_dir
    have = state.root.signed.version if (metadata / "root.json").exists() else 0
    want = keys_root.signed.version
    if have > want:
        raise PublishError(
            f"the repository has root version {have}, {keys_dir} only {want}",
            hint="use the keys directory the repository was last published with",
        )
    if (
        have
        and (keys_dir / f"{have}.root.json").read_bytes()
        != (metadata / f"{have}.root.json").read_bytes()
    ):
        raise PublishError(
            f"{metadata / f'{have}.root.json'} differs from {keys_dir / f'{have}.root.json'}",
            hint="the repository was initialised with another keys directory",
        )
    for version in range(have + 1, want + 1):
        source = keys_dir / f"{version}.root.json"
        if not source.exists():
            raise PublishError(
                f"{source} is missing; clients walk every root version in turn",
                hint="restore it from a backup of the keys directory",
            )
        _store(metadata / f"{version}.root.json", source.read_bytes())
    if want > have:
        _store(metadata / "root.json", (keys_dir / "root.json").read_bytes())
        state.root = keys_root
        return True
    return False


def _commit(
    state: _State, signers: Mapping[str, Signer], now: datetime, *, targets: bool, snapshot: bool
) -> PublishResult:
    """Bump, sign and write the roles from targets down to timestamp, timestamp last."""
    metadata = state.metadata_dir
    if targets:
        md = state.targets
        state.bump(md)
        md.signed.expires = now + EXPIRY[Targets.type]
        md.signatures.clear()
        md.sign(signers[Targets.type])
        data = md.to_bytes(_SERIALIZER)
        _store(metadata / f"{md.signed.version}.targets.json", data)
        state.snapshot.signed.meta["targets.json"] = MetaFile.from_data(
            md.signed.version, data, ["sha256"]
        )
    if targets or snapshot:
        snap = state.snapshot
        state.bump(snap)
        snap.signed.expires = now + EXPIRY[Snapshot.type]
        snap.signatures.clear()
        snap.sign(signers[Snapshot.type])
        data = snap.to_bytes(_SERIALIZER)
        _store(metadata / f"{snap.signed.version}.snapshot.json", data)
        # Length and hash, not just the version: a mirror cannot pass off other bytes under the
        # expected name (the client checks them before parsing).
        state.timestamp.signed.snapshot_meta = MetaFile.from_data(
            snap.signed.version, data, ["sha256"]
        )
    ts = state.timestamp
    state.bump(ts)
    ts.signed.expires = now + EXPIRY[Timestamp.type]
    ts.signatures.clear()
    ts.sign(signers[Timestamp.type])
    _store(metadata / "timestamp.json", ts.to_bytes(_SERIALIZER))
    return _result(state, changed=True)


def _result(state: _State, *, changed: bool) -> PublishResult:
    return PublishResult(
        changed=changed,
        targets_version=state.targets.signed.version,
        snapshot_version=state.snapshot.signed.version,
        timestamp_version=state.timestamp.signed.version,
        expires=MappingProxyType(
            {
                Root.type: state.root.signed.expires,
                Targets.type: state.targets.signed.expires,
                Snapshot.type: state.snapshot.signed.expires,
                Timestamp.type: state.timestamp.signed.expires,
            }
        ),
    )


def _online_signers(keys_dir: Path, root: Root, roles: tuple[str, ...]) -> dict[str, Signer]:
    return {role: _load_signer(keys_dir, root, role) for role in roles}


def _target_file(repo: Path, target: TargetFile) -> Path:
    directory, _, name = target.path.rpartition("/")
    return repo / "targets" / directory / f"{target.hashes['sha256']}.{name}"


def channel_target(channel: str) -> str:
    return f"channels/{channel}.json"


def _check_channel_name(channel: str) -> None:
    if not channels.CHANNEL_NAME.fullmatch(channel):
        raise PublishError(
            f"channel name {channel!r} is not usable",
            hint="use lowercase letters, digits, '.', '_' and '-', like stable or beta",
        )


def _read_channel(state: _State, channel: str) -> ChannelManifest:
    target = state.targets.signed.targets.get(channel_target(channel))
    if target is None:
        return ChannelManifest(channel)
    path = _target_file(state.repo, target)
    try:
        data = path.read_bytes()
        target.verify_length_and_hashes(data)
    except FileNotFoundError:
        raise PublishError(f"{path} is missing: the repository is incomplete") from None
    except Exception as e:
        raise PublishError(f"{path} does not match its signed length and hash: {e}") from None
    try:
        manifest = channels.parse(data.decode(), str(path))
    except (ChannelError, UnicodeDecodeError) as e:
        raise PublishError(str(e)) from None
    if manifest.channel != channel:
        raise PublishError(f"{path}: names channel {manifest.channel!r}, expected {channel!r}")
    return manifest


def _add_target(state: _State, target: TargetFile) -> None:
    existing = state.targets.signed.targets.get(target.path)
    if existing is not None and existing.path.startswith("channels/"):
        state.targets.signed.targets[target.path] = target
        return
    if existing is not None and existing != target:
        raise PublishError(
            f"target {target.path} is already published with other content",
            hint="a published version is immutable: build and publish a new version",
        )
    state.targets.signed.targets[target.path] = target


def _write_channel(state: _State, manifest: ChannelManifest) -> None:
    data = manifest.to_json().encode()
    target = TargetFile.from_data(channel_target(manifest.channel), data, ["sha256"])
    path = _target_file(state.repo, target)
    if not path.exists():
        _store(path, data)
    # Older channel documents stay: clients still holding the previous snapshot fetch them by hash.
    _add_target(state, target)


def _copy_verified(source: Path, dest_dir: Path, name: str, expected: FileEntry) -> None:
    """Check `source` against the manifest, copying it to `<sha256>.<name>` in the same pass."""
    dest = dest_dir / f"{expected.sha256}.{name}"
    dest_dir.mkdir(parents=True, exist_ok=True)

    def check(found: FileEntry) -> None:
        if found != expected:
            raise PublishError(
                f"{source} does not match the release manifest: {found.size} bytes, sha256 "
                f"{found.sha256}; the manifest says {expected.size} bytes, sha256 "
                f"{expected.sha256}",
                hint="the release directory was changed after the build; rebuild it",
            )

    if dest.exists():
        # Named by its hash and checked when it was written: only the source needs checking.
        check(hash_file(source))
        return
    # The copy is written from the very blocks that are hashed, and renamed into place only if
    # they match: what is published is what was checked, even if the source changes meanwhile.
    with atomic_writer(dest) as out:
        check(hash_file(source, copy_to=out))


def read_release(release_dir: Path) -> Manifest:
    """The release manifest of `out/<image>/<version>/`, checked for a complete payload."""
    path = release_dir / "manifest.json"
    try:
        manifest = Manifest.from_json(path.read_text(encoding="utf-8"), str(path))
    except FileNotFoundError:
        raise PublishError(
            f"{path} is missing", hint="publish a release directory written by ./build.py"
        ) from None
    except (ManifestError, UnicodeDecodeError) as e:
        raise PublishError(str(e)) from None
    for field_name, value in (("image", manifest.image), ("arch", manifest.arch)):
        if not _NAME.fullmatch(value):
            raise PublishError(f"{path}: field '{field_name}': {value!r} is not a plain name")
    missing = [name for name in PAYLOAD_FILES if name not in manifest.files]
    extra = sorted(set(manifest.files) - set(PAYLOAD_FILES))
    if missing or extra:
        raise PublishError(
            f"{path}: field 'files': expected exactly {', '.join(PAYLOAD_FILES)}"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unexpected {', '.join(extra)}" if extra else "")
        )
    for name in PAYLOAD_FILES:
        if not (release_dir / name).is_file():
            raise PublishError(f"{release_dir / name} is missing (listed in {path})")
    return manifest


# ---------------------------------------------------------------------------------------------
# Operations


def publish(
    release_dir: Path,
    repo: Path,
    keys_dir: Path,
    channel: str,
    *,
    now: datetime | None = None,
    waves: Mapping[int, datetime] | None = None,
    immediate: bool = False,
    max_version: Version | None = None,
) -> PublishResult:
    """Add a release's payload to the repository and the release to `channel`, then re-sign.

    A new release gets `waves` (default: `channels.default_waves(now)`; `immediate` opens one
    wave for everyone now). Publishing a release that is already in the channel keeps its waves
    and its pulled flag unless `waves` or `immediate` is given, so a repeated publish changes
    nothing; when nothing changes, no metadata is re-signed and `changed` is False. `max_version`,
    when given, sets the channel's pin (`set_max_version` also clears it).
    """
    _check_channel_name(channel)
    if waves is not None and immediate:
        raise PublishError("give either waves or immediate, not both")
    when = _now(now)
    manifest = read_release(release_dir)
    keys_root = load_trusted_root(keys_dir)
    signers = _online_signers(keys_dir, keys_root.signed, ONLINE_ROLES)
    if waves is not None:
        try:
            waves = channels.check_waves(waves)
        except ChannelError as e:
            raise PublishError(str(e)) from None

    with _locked(repo):
        state = _load_state(repo, keys_root, when)
        before = dict(state.targets.signed.targets)
        root_changed = _sync_root(state, keys_dir, keys_root)

        prefix = f"{manifest.image}/{manifest.version}"
        target_paths: dict[str, str] = {}
        for name in PAYLOAD_FILES:
            entry = manifest.files[name]
            path = f"{prefix}/{name}"
            _add_target(state, TargetFile(entry.size, {"sha256": entry.sha256}, path))
            _copy_verified(release_dir / name, repo / "targets" / prefix, name, entry)
            target_paths[name] = path
        manifest_data = (release_dir / "manifest.json").read_bytes()
        manifest_target = TargetFile.from_data(f"{prefix}/manifest.json", manifest_data, ["sha256"])
        _add_target(state, manifest_target)
        manifest_file = _target_file(repo, manifest_target)
        if not manifest_file.exists():
            _store(manifest_file, manifest_data)
        target_paths["manifest.json"] = manifest_target.path

        current = _read_channel(state, channel)
        existing = current.find(manifest.image, manifest.arch, manifest.version)
        if existing is not None and existing.roothash != manifest.roothash:
            raise PublishError(
                f"{existing.label} is already in channel {channel} with root hash "
                f"{existing.roothash}, this build has {manifest.roothash}",
                hint="a published version is immutable: build and publish a new version",
            )
        if immediate:
            new_waves = channels.immediate_waves(when)
        elif waves is not None:
            new_waves = waves
        elif existing is not None:
            new_waves = existing.waves
        else:
            new_waves = channels.default_waves(when)
        release = Release(
            image=manifest.image,
            arch=manifest.arch,
            version=manifest.version,
            roothash=manifest.roothash,
            targets=MappingProxyType(target_paths),
            waves=new_waves,
            pulled=existing.pulled if existing is not None else False,
        )
        updated = current.with_release(release)
        if max_version is not None:
            updated = replace(updated, max_version=max_version)
        _write_channel(state, updated)

        if state.targets.signed.targets == before and not root_changed:
            return _result(state, changed=False)
        return _commit(state, signers, when, targets=True, snapshot=True)


def _change_channel(
    repo: Path,
    keys_dir: Path,
    channel: str,
    now: datetime | None,
    change: Callable[[ChannelManifest], ChannelManifest],
) -> PublishResult:
    _check_channel_name(channel)
    when = _now(now)
    keys_root = load_trusted_root(keys_dir)
    signers = _online_signers(keys_dir, keys_root.signed, ONLINE_ROLES)
    with _locked(repo):
        state = _load_state(repo, keys_root, when)
        if channel_target(channel) not in state.targets.signed.targets:
            raise PublishError(f"channel {channel} does not exist in {repo}")
        before = dict(state.targets.signed.targets)
        root_changed = _sync_root(state, keys_dir, keys_root)
        _write_channel(state, change(_read_channel(state, channel)))
        if state.targets.signed.targets == before and not root_changed:
            return _result(state, changed=False)
        return _commit(state, signers, when, targets=True, snapshot=True)


def pull(
    repo: Path,
    keys_dir: Path,
    channel: str,
    version: Version,
    *,
    image: str | None = None,
    arch: str | None = None,
    undo: bool = False,
    now: datetime | None = None,
) -> PublishResult:
    """Mark every release of `version` in `channel` (optionally one image/arch) as pulled.

    No machine selects a pulled release, and one that has not finished installing it stops at its
    next check. `undo` makes it installable again. The payload stays in the repository.
    """

    def change(manifest: ChannelManifest) -> ChannelManifest:
        matches = [
            r
            for r in manifest.releases
            if r.version == version
            and (image is None or r.image == image)
            and (arch is None or r.arch == arch)
        ]
        if not matches:
            raise PublishError(f"no release {version} in channel {channel} to pull")
        for release in matches:
            manifest = manifest.with_release(replace(release, pulled=not undo))
        return manifest

    return _change_channel(repo, keys_dir, channel, now, change)


def set_max_version(
    repo: Path,
    keys_dir: Path,
    channel: str,
    version: Version | None,
    *,
    now: datetime | None = None,
) -> PublishResult:
    """Pin `channel` so no machine goes above `version`; None lifts the pin."""
    return _change_channel(
        repo, keys_dir, channel, now, lambda manifest: replace(manifest, max_version=version)
    )


def refresh(
    repo: Path,
    keys_dir: Path,
    *,
    now: datetime | None = None,
    timestamp_only: bool = False,
) -> PublishResult:
    """Re-sign targets, snapshot and timestamp with new versions and expiry dates.

    Run it well inside the timestamp's one-day expiry (a timer every few hours): an expired
    timestamp stops every machine from updating. `timestamp_only` needs only the timestamp key,
    for a signing host that holds nothing else. New root versions in the keys directory are
    copied into the repository.
    """
    when = _now(now)
    keys_root = load_trusted_root(keys_dir)
    roles = (Timestamp.type,) if timestamp_only else ONLINE_ROLES
    signers = _online_signers(keys_dir, keys_root.signed, roles)
    with _locked(repo):
        state = _load_state(repo, keys_root, when)
        if state.fresh:
            raise PublishError(
                f"{repo} has no repository to refresh", hint="publish a release first"
            )
        _sync_root(state, keys_dir, keys_root)
        return _commit(
            state, signers, when, targets=not timestamp_only, snapshot=not timestamp_only
        )


def read_channel(repo: Path, keys_dir: Path, channel: str) -> ChannelManifest:
    """The channel manifest as published, verified against the repository's signed metadata."""
    _check_channel_name(channel)
    keys_root = load_trusted_root(keys_dir)
    state = _load_state(repo, keys_root, _now(None))
    if channel_target(channel) not in state.targets.signed.targets:
        raise PublishError(f"channel {channel} does not exist in {repo}")
    return _read_channel(state, channel)


def describe_keys(keys_dir: Path) -> dict[str, object]:
    """Roles, key ids, thresholds and expiry of the newest root, for `keys show`."""
    root = load_trusted_root(keys_dir).signed
    return {
        "version": root.version,
        "expires": channels.format_time(root.expires),
        "roles": {
            role: {"threshold": root.roles[role].threshold, "keyids": root.roles[role].keyids}
            for role in ROLES
        },
        "private_keys": sorted(p.name for p in keys_dir.glob("*.pem")),
    }
