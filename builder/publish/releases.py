"""A release directory (`out/<image>/<version>/`) into the repository: its payload copied under
its hash, checked against its manifest in the same pass, and the release added to a channel."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from types import MappingProxyType

from tuf.api.metadata import TargetFile

from builder.errors import PublishError
from builder.publish.channels import check_channel_name, load_channel, write_channel
from builder.publish.keys import signing_time
from builder.publish.repository import (
    PublishResult,
    State,
    add_target,
    change_targets,
    target_file,
)
from builder.publish.staging import Staging
from updater.release.blockindex import INDEXED_FILES, index_file, index_name
from updater.release.channel import (
    ChannelError,
    ChannelManifest,
    Release,
    check_waves,
    default_waves,
    immediate_waves,
)
from updater.release.manifest import PAYLOAD_FILES, FileEntry, Manifest, ManifestError, hash_file
from updater.release.packages import PackageChanges, PackagesError, parse_package_list
from updater.release.version import Version

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
PACKAGES_FILE = "packages.txt"


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


def _copy_verified(
    staging: Staging, source: Path, dest_dir: Path, name: str, expected: FileEntry
) -> None:
    """Check `source` against the manifest, staging its copy as `<sha256>.<name>` in the same
    pass."""
    dest = dest_dir / f"{expected.sha256}.{name}"

    def check(found: FileEntry) -> None:
        if found != expected:
            raise PublishError(
                f"{source} does not match the release manifest: {found.size} bytes, sha256 "
                f"{found.sha256}; the manifest says {expected.size} bytes, sha256 "
                f"{expected.sha256}",
                hint="the release directory was changed after the build; rebuild it",
            )

    if staging.exists(dest):
        # Named by its hash and checked when it was written: only the source needs checking.
        check(hash_file(source))
        return
    # The copy is written from the very blocks that are hashed, and staged only if they match:
    # what is published is what was checked, even if the source changes meanwhile.
    with staging.writer(dest) as out:
        check(hash_file(source, copy_to=out))


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
    lift_max_version: bool = False,
) -> PublishResult:
    """Add a release's payload to the repository and the release to `channel`, then re-sign.

    A new release gets `waves` (default: `updater.release.channel.default_waves(now)`;
    `immediate` opens one wave for everyone now). Publishing a release that is already in the
    channel keeps its waves and its pulled flag unless `waves` or `immediate` is given, so a
    repeated publish changes nothing; when nothing changes, no metadata is re-signed and `changed`
    is False. `max_version`, when given, sets the channel's pin; `lift_max_version` clears it, in
    the same signed change (`set_max_version` changes the pin alone).
    """
    check_channel_name(channel)
    if waves is not None and immediate:
        raise PublishError("give either waves or immediate, not both")
    if max_version is not None and lift_max_version:
        raise PublishError(
            f"max_version {max_version} and lift_max_version contradict each other: give one"
        )
    when = signing_time(now)
    manifest = read_release(release_dir)
    if waves is not None:
        try:
            waves = check_waves(waves)
        except ChannelError as e:
            raise PublishError(str(e)) from None
    chosen = immediate_waves(when) if immediate else waves

    packages = _read_packages(release_dir)
    published: list[Release] = []

    def edit(state: State) -> None:
        targets = _add_payload(state, release_dir, manifest, packages)
        updated = _with_release(state, channel, manifest, targets, chosen, when, packages)
        if max_version is not None or lift_max_version:
            updated = replace(updated, max_version=max_version)
        write_channel(state, updated)
        found = updated.find(manifest.image, manifest.arch, manifest.version)
        if found is not None:
            published.append(found)

    result = change_targets(repo, keys_dir, when, edit, create=True)
    return replace(result, changes=published[-1].changes if published else None)


@dataclass(frozen=True)
class _PackageList:
    """A release's packages.txt: its bytes (published as they are) and what they list."""

    data: bytes
    versions: Mapping[str, str]


def _read_packages(release_dir: Path) -> _PackageList | None:
    """The release's packages.txt (None for a release directory from before they existed),
    checked before anything is written."""
    path = release_dir / PACKAGES_FILE
    if not path.is_file():
        return None
    data = path.read_bytes()
    try:
        return _PackageList(data, parse_package_list(data.decode("utf-8"), str(path)))
    except UnicodeDecodeError:
        raise PublishError(f"{path}: expected UTF-8 text") from None
    except PackagesError as e:
        raise PublishError(str(e)) from None


def _previous_packages(
    state: State, current: ChannelManifest, manifest: Manifest
) -> tuple[Version, dict[str, str]] | None:
    """The package list of the newest release before `manifest` on the channel (pulled ones
    aside: nobody was meant to run them), when the repository holds it."""
    earlier = [
        r
        for r in current.releases
        if (r.image, r.arch) == (manifest.image, manifest.arch)
        and r.version < manifest.version
        and not r.pulled
    ]
    for release in sorted(earlier, key=lambda r: r.version, reverse=True):
        target = state.targets.signed.targets.get(
            f"{manifest.image}/{release.version}/{PACKAGES_FILE}"
        )
        if target is None:
            continue
        path = target_file(state.repo, target)
        try:
            return release.version, parse_package_list(path.read_text(encoding="utf-8"), str(path))
        except (OSError, UnicodeDecodeError, PackagesError) as e:
            raise PublishError(
                f"the package list of {release.label} in the repository: {e}"
            ) from None
    return None


def _add_payload(
    state: State, release_dir: Path, manifest: Manifest, packages: _PackageList | None
) -> Mapping[str, str]:
    """Copy the payload and the manifest into the repository as targets; file name -> target.
    The package list goes in too (not named by the release: only the next publish reads it)."""
    prefix = f"{manifest.image}/{manifest.version}"
    target_paths: dict[str, str] = {}
    for name in PAYLOAD_FILES:
        entry = manifest.files[name]
        path = f"{prefix}/{name}"
        add_target(state, TargetFile(entry.size, {"sha256": entry.sha256}, path))
        _copy_verified(
            state.staging, release_dir / name, state.repo / "targets" / prefix, name, entry
        )
        target_paths[name] = path
    manifest_data = (release_dir / "manifest.json").read_bytes()
    manifest_target = TargetFile.from_data(f"{prefix}/manifest.json", manifest_data, ["sha256"])
    add_target(state, manifest_target)
    manifest_file = target_file(state.repo, manifest_target)
    if not state.staging.exists(manifest_file):
        state.staging.write(manifest_file, manifest_data)
    target_paths["manifest.json"] = manifest_target.path
    # The block indexes a machine compares with what it has, to fetch only the blocks it lacks
    # (updater/release/blockindex.py); made from the file just checked against the manifest.
    for name in INDEXED_FILES:
        data = index_file(release_dir / name)
        index = TargetFile.from_data(f"{prefix}/{index_name(name)}", data, ["sha256"])
        add_target(state, index)
        index_path = target_file(state.repo, index)
        if not state.staging.exists(index_path):
            state.staging.write(index_path, data)
        target_paths[index_name(name)] = index.path
    if packages is not None:
        listed = TargetFile.from_data(f"{prefix}/{PACKAGES_FILE}", packages.data, ["sha256"])
        add_target(state, listed)
        listed_file = target_file(state.repo, listed)
        if not state.staging.exists(listed_file):
            state.staging.write(listed_file, packages.data)
    return MappingProxyType(target_paths)


def _with_release(
    state: State,
    channel: str,
    manifest: Manifest,
    targets: Mapping[str, str],
    waves: Mapping[int, datetime] | None,
    when: datetime,
    packages: _PackageList | None = None,
) -> ChannelManifest:
    """The channel's manifest with this release added, or its entry updated (a published
    release keeps the change list it was published with)."""
    current = load_channel(state, channel)
    existing = current.find(manifest.image, manifest.arch, manifest.version)
    if existing is not None and existing.roothash != manifest.roothash:
        raise PublishError(
            f"{existing.label} is already in channel {channel} with root hash "
            f"{existing.roothash}, this build has {manifest.roothash}",
            hint="a published version is immutable: build and publish a new version",
        )
    if waves is not None:
        new_waves = waves
    elif existing is not None:
        new_waves = existing.waves
    else:
        new_waves = default_waves(when)
    release = Release(
        image=manifest.image,
        arch=manifest.arch,
        version=manifest.version,
        roothash=manifest.roothash,
        targets=targets,
        waves=new_waves,
        pulled=existing.pulled if existing is not None else False,
        changes=existing.changes
        if existing is not None
        else _changes(state, current, manifest, packages),
    )
    return current.with_release(release)


def _changes(
    state: State, current: ChannelManifest, manifest: Manifest, packages: _PackageList | None
) -> PackageChanges | None:
    previous = _previous_packages(state, current, manifest) if packages is not None else None
    if previous is None or packages is None:
        return None
    since, before = previous
    return PackageChanges.between(since, before, packages.versions)
