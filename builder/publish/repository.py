"""The repository's state: its metadata loaded and verified, changed, then signed and written.

The repository is plain static files that any web server, object store or CDN can serve:

    metadata/root.json, metadata/<N>.root.json
    metadata/timestamp.json
    metadata/<N>.snapshot.json, metadata/<N>.targets.json
    targets/<dir>/<sha256>.<name>             consistent snapshots: a file name never changes
                                              content, so mirrors and caches can never serve a
                                              half-updated release

A change is staged (`staging.py`): every new file is written under a temporary name, and only when
all are written and signed are they renamed, payload first and `timestamp.json` last. Until the
timestamp is replaced, clients see the previous repository state in full; a change that fails
leaves the repository's files exactly as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from securesystemslib.signer import Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp

from builder.errors import PublishError
from builder.lock import exclusive
from builder.publish.keys import (
    EXPIRY,
    ONLINE_ROLES,
    SERIALIZER,
    online_signers,
    open_keys,
    signing_time,
)
from builder.publish.staging import Staging
from updater.release.packages import PackageChanges

# The targets under this directory are channel documents, the only targets that change.
CHANNEL_DIR = "channels"


@dataclass(frozen=True)
class PublishResult:
    """What a publishing operation left in the repository."""

    changed: bool  # False when the repository already held exactly this content
    targets_version: int
    snapshot_version: int
    timestamp_version: int
    expires: Mapping[str, datetime]  # role -> expiry of the metadata now in the repository
    # A published release's package changes since the one before it on its channel.
    changes: PackageChanges | None = None


def no_repository(repo: Path) -> PublishError:
    return PublishError(
        f"no repository at {repo}",
        hint=f"publish a release into it first: ./build.py publish out/<image>/<version> "
        f"--repo {repo}",
    )


@contextlib.contextmanager
def _locked(repo: Path, staging: Staging | None) -> Iterator[None]:
    """Hold the repository's lock. With `staging` a missing repository is created (and removed
    by the staging's discard); without, a missing one is refused and nothing is created.

    Two publishers at once would both sign version N+1 of different content. The lock is the
    directory itself: a lock file inside the repository would be served with it.
    """
    while True:
        if repo.exists() and not repo.is_dir():
            raise PublishError(f"{repo}: expected a repository directory, found a file")
        if staging is not None:
            staging.make_dirs(repo)
        elif not repo.is_dir():
            raise no_repository(repo)
        with exclusive(repo, "another publisher"):
            # A first publish that failed while this one waited removed the directory it had
            # created, and this lock is on that directory: look again.
            if repo.is_dir():
                yield
                return


@dataclass
class State:
    """The repository's current metadata, loaded and verified; mutated, then committed."""

    repo: Path
    root: Metadata[Root]
    targets: Metadata[Targets]
    snapshot: Metadata[Snapshot]
    timestamp: Metadata[Timestamp]
    fresh: bool = False  # nothing published yet: the first commit writes version 1 of each role
    # The change's new files, in place only once `_commit` has signed everything.
    staging: Staging = field(default_factory=Staging)

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


def load_state(
    repo: Path,
    keys_root: Metadata[Root],
    now: datetime,
    *,
    must_exist: bool = False,
    staging: Staging | None = None,
) -> State:
    """The repository's metadata, each role verified by the one above it; a fresh state when
    nothing is published yet, unless `must_exist`. `staging` holds the files a change writes."""
    metadata = repo / "metadata"
    repo_root_path = metadata / "root.json"
    if not (metadata / "timestamp.json").exists():
        if any(metadata.glob("*.json")):
            raise PublishError(
                f"{metadata} has metadata but no timestamp.json: not a complete repository"
            )
        if must_exist:
            raise no_repository(repo)
        return State(
            repo,
            keys_root,
            Metadata(Targets(expires=now)),
            Metadata(Snapshot(expires=now)),
            Metadata(Timestamp(expires=now)),
            fresh=True,
            staging=staging or Staging(),
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
    return State(repo, root_md, targets, snapshot, timestamp, staging=staging or Staging())


def _sync_root(state: State, keys_dir: Path, keys_root: Metadata[Root]) -> bool:
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
        state.staging.write(metadata / f"{version}.root.json", source.read_bytes())
    if want > have:
        state.staging.write(metadata / "root.json", (keys_dir / "root.json").read_bytes())
        state.root = keys_root
        return True
    return False


def _commit(
    state: State, signers: Mapping[str, Signer], now: datetime, *, targets: bool, snapshot: bool
) -> PublishResult:
    """Bump, sign and stage the roles from targets down to timestamp, then put every staged file
    in place, timestamp last."""
    if targets:
        data = _resign(state, state.targets, signers, now)
        state.snapshot.signed.meta["targets.json"] = MetaFile.from_data(
            state.targets.signed.version, data, ["sha256"]
        )
    if targets or snapshot:
        data = _resign(state, state.snapshot, signers, now)
        # Length and hash, not just the version: a mirror cannot pass off other bytes under the
        # expected name (the client checks them before parsing).
        state.timestamp.signed.snapshot_meta = MetaFile.from_data(
            state.snapshot.signed.version, data, ["sha256"]
        )
    _resign(state, state.timestamp, signers, now)
    state.staging.commit()
    return _result(state, changed=True)


def _resign(state: State, md: Metadata[Any], signers: Mapping[str, Signer], now: datetime) -> bytes:
    """Give one role a new version, expiry and signature; stage it and return what was staged."""
    role = md.signed.type
    state.bump(md)
    md.signed.expires = now + EXPIRY[role]
    md.signatures.clear()
    try:
        md.sign(signers[role])
    except UnsignedMetadataError as e:
        raise PublishError(f"signing the {role} metadata failed: {e}") from None
    data = md.to_bytes(SERIALIZER)
    # Consistent snapshots: every version of a role has its own name, except the timestamp that
    # clients fetch first and by a fixed name.
    name = "timestamp.json" if role == Timestamp.type else f"{md.signed.version}.{role}.json"
    state.staging.write(state.metadata_dir / name, data)
    return data


def _result(state: State, *, changed: bool) -> PublishResult:
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


def target_file(repo: Path, target: TargetFile) -> Path:
    """Where a target is stored: under its hash (consistent snapshots)."""
    directory, _, name = target.path.rpartition("/")
    return repo / "targets" / directory / f"{target.hashes['sha256']}.{name}"


def add_target(state: State, target: TargetFile) -> None:
    """List `target` in the targets metadata. A channel document replaces its previous version;
    any other target is immutable once published."""
    existing = state.targets.signed.targets.get(target.path)
    if existing is not None and existing.path.startswith(f"{CHANNEL_DIR}/"):
        state.targets.signed.targets[target.path] = target
        return
    if existing is not None and existing != target:
        raise PublishError(
            f"target {target.path} is already published with other content",
            hint="a published version is immutable: build and publish a new version",
        )
    state.targets.signed.targets[target.path] = target


@contextlib.contextmanager
def _changing(
    repo: Path, keys_root: Metadata[Root], when: datetime, *, create: bool
) -> Iterator[State]:
    """The repository's state under its lock, for one change that `_commit` puts in place.

    Whatever fails before the commit, every file and directory the change staged is removed, so
    the repository is as it was. `create` lets the change make a new repository; without it, a
    missing one is refused and nothing is created. Disk errors become a PublishError.
    """
    staging = Staging()
    try:
        with _locked(repo, staging if create else None):
            try:
                yield load_state(repo, keys_root, when, must_exist=not create, staging=staging)
            finally:
                staging.discard()  # after a commit, nothing is left to discard
    except OSError as e:
        raise PublishError(
            f"{repo}: the change failed and was undone, the repository is as it was: {e}"
        ) from None


def change_targets(
    repo: Path,
    keys_dir: Path,
    when: datetime,
    edit: Callable[[State], None],
    *,
    check: Callable[[State], None] | None = None,
    create: bool = False,
) -> PublishResult:
    """One signed change of the repository's targets, under its lock.

    Loads and verifies the repository, lets `check` refuse before anything is staged, copies new
    root versions from the keys directory, lets `edit` change the targets, then signs targets,
    snapshot and timestamp and puts everything in place. When neither the targets nor the root
    changed nothing is re-signed and `changed` is False, so a repeated publish leaves the
    repository as it was. Only with `create` may the repository be new.
    """
    keys_root = open_keys(keys_dir)
    signers = online_signers(keys_dir, keys_root.signed, ONLINE_ROLES)
    with _changing(repo, keys_root, when, create=create) as state:
        if check is not None:
            check(state)
        before = dict(state.targets.signed.targets)
        root_changed = _sync_root(state, keys_dir, keys_root)
        edit(state)
        if state.targets.signed.targets == before and not root_changed:
            return _result(state, changed=False)
        return _commit(state, signers, when, targets=True, snapshot=True)


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
    copied into the repository. A missing repository is refused, never created.
    """
    when = signing_time(now)
    keys_root = open_keys(keys_dir)
    roles = (Timestamp.type,) if timestamp_only else ONLINE_ROLES
    signers = online_signers(keys_dir, keys_root.signed, roles)
    with _changing(repo, keys_root, when, create=False) as state:
        _sync_root(state, keys_dir, keys_root)
        return _commit(
            state, signers, when, targets=not timestamp_only, snapshot=not timestamp_only
        )
