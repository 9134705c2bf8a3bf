"""Channel documents: one signed target per channel (`channels/<name>.json`) listing its releases,
their waves, which are pulled, and the channel's `max_version`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from tuf.api.metadata import TargetFile

from builder.errors import PublishError
from builder.publish.keys import load_trusted_root, signing_time
from builder.publish.repository import (
    CHANNEL_DIR,
    PublishResult,
    State,
    add_target,
    change_targets,
    load_state,
    target_file,
)
from updater.release.channel import CHANNEL_NAME, ChannelError, ChannelManifest
from updater.release.channel import parse as parse_channel
from updater.release.version import Version


def _channel_target(channel: str) -> str:
    return f"{CHANNEL_DIR}/{channel}.json"


def check_channel_name(channel: str) -> None:
    if not CHANNEL_NAME.fullmatch(channel):
        raise PublishError(
            f"channel name {channel!r} is not usable",
            hint="use lowercase letters, digits, '.', '_' and '-', like stable or beta",
        )


def _require(state: State, channel: str) -> None:
    if _channel_target(channel) not in state.targets.signed.targets:
        raise PublishError(f"channel {channel} does not exist in {state.repo}")


def load_channel(state: State, channel: str) -> ChannelManifest:
    """The channel's manifest as `state` lists it, checked against its signed length and hash;
    an empty one for a channel not published yet."""
    target = state.targets.signed.targets.get(_channel_target(channel))
    if target is None:
        return ChannelManifest(channel)
    path = target_file(state.repo, target)
    try:
        data = path.read_bytes()
        target.verify_length_and_hashes(data)
    except FileNotFoundError:
        raise PublishError(f"{path} is missing: the repository is incomplete") from None
    except Exception as e:
        raise PublishError(f"{path} does not match its signed length and hash: {e}") from None
    try:
        manifest = parse_channel(data.decode(), str(path))
    except (ChannelError, UnicodeDecodeError) as e:
        raise PublishError(str(e)) from None
    if manifest.channel != channel:
        raise PublishError(f"{path}: names channel {manifest.channel!r}, expected {channel!r}")
    return manifest


def write_channel(state: State, manifest: ChannelManifest) -> None:
    """Stage `manifest` under its hash and list it as the channel's current document."""
    data = manifest.to_json().encode()
    target = TargetFile.from_data(_channel_target(manifest.channel), data, ["sha256"])
    path = target_file(state.repo, target)
    if not state.staging.exists(path):
        state.staging.write(path, data)
    # Older channel documents stay: clients still holding the previous snapshot fetch them by hash.
    add_target(state, target)


def _change_channel(
    repo: Path,
    keys_dir: Path,
    channel: str,
    now: datetime | None,
    change: Callable[[ChannelManifest], ChannelManifest],
) -> PublishResult:
    check_channel_name(channel)

    def edit(state: State) -> None:
        write_channel(state, change(load_channel(state, channel)))

    return change_targets(
        repo, keys_dir, signing_time(now), edit, check=lambda state: _require(state, channel)
    )


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


def read_channel(repo: Path, keys_dir: Path, channel: str) -> ChannelManifest:
    """The channel manifest as published, verified against the repository's signed metadata.
    Reads only: a missing repository is refused, never created."""
    check_channel_name(channel)
    keys_root = load_trusted_root(keys_dir)
    state = load_state(repo, keys_root, signing_time(None), must_exist=True)
    _require(state, channel)
    return load_channel(state, channel)
