"""The signed per-channel manifest (TUF target `channels/<channel>.json`) and rollout selection.

One module for both sides: the publisher writes channel manifests, the agent reads them and picks
the release this machine should install. Standard library only: the agent runs on the image's own
Python.

Rollouts follow Bottlerocket's waves. Every machine has a seed in 0..2047 (`machine_seed`). A
release carries waves, each a seed bound (1..2048) with a start time; a machine with seed `s` may
take the release once the start of the first wave whose bound is greater than `s` has passed. The
last wave must have bound 2048 so that every machine is eventually covered.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from updater.errors import UpdateError
from updater.release.blockindex import INDEXED_FILES, index_name
from updater.release.document import json_object
from updater.release.identity import app_specific_id
from updater.release.manifest import PAYLOAD_FILES
from updater.release.packages import PackageChanges, PackagesError, compose
from updater.release.version import Version

SEED_RANGE = 2048
# Every release names these targets: the payload plus the release manifest it was checked against.
RELEASE_TARGETS = (*PAYLOAD_FILES, "manifest.json")
# And may name these: the block indexes of payload files (absent from releases published before
# they existed; a machine then fetches those files whole).
INDEX_TARGETS = tuple(index_name(name) for name in INDEXED_FILES)

# Default rollout (bound, delay after publishing): about 5% at once, 25% after 4 hours, 50% after
# 12 hours, everyone after a day. Early waves find a bad release while most of the fleet waits.
DEFAULT_WAVES: tuple[tuple[int, timedelta], ...] = (
    (102, timedelta(0)),
    (512, timedelta(hours=4)),
    (1024, timedelta(hours=12)),
    (SEED_RANGE, timedelta(hours=24)),
)

# A fixed application key, in the spirit of sd_id128_get_machine_app_specific(): the seed derives
# from the machine id without revealing it, and other applications' ids derived from the same
# machine id do not correlate with it.
_SEED_APP_KEY = bytes.fromhex("6c1b0e5d2f9a4c3e8b7d1a2f4e6c8b0d")
_HEX64 = re.compile(r"[0-9a-f]{64}")
CHANNEL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


class ChannelError(UpdateError, ValueError):
    """A channel manifest is malformed; the message names the source, the field and the rule."""


@dataclass(frozen=True)
class Release:
    image: str
    arch: str
    version: Version
    roothash: str
    # Name in the release ("root.erofs", ...) -> TUF target path ("containerhost/1.2.3/root.erofs").
    targets: Mapping[str, str]
    # Seed bound (1..2048) -> the time that wave opens.
    waves: Mapping[int, datetime]
    pulled: bool = False
    # The package changes since the release before it on the channel (None: not known, e.g.
    # the first release, or one published before change lists existed).
    changes: PackageChanges | None = None

    @property
    def label(self) -> str:
        return f"{self.image} {self.version} ({self.arch})"


@dataclass(frozen=True)
class ChannelManifest:
    channel: str
    max_version: Version | None = None
    releases: tuple[Release, ...] = ()

    def find(self, image: str, arch: str, version: Version) -> Release | None:
        for release in self.releases:
            if (release.image, release.arch, release.version) == (image, arch, version):
                return release
        return None

    def with_release(self, release: Release) -> ChannelManifest:
        """This channel with `release` added, replacing one of the same image, arch and version."""
        key = (release.image, release.arch, release.version)
        others = [r for r in self.releases if (r.image, r.arch, r.version) != key]
        return replace(self, releases=_sorted((*others, release)))

    def to_json(self) -> str:
        doc = {
            "channel": self.channel,
            "max_version": None if self.max_version is None else str(self.max_version),
            "releases": [_release_to_dict(r) for r in _sorted(self.releases)],
        }
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def _sorted(releases: Collection[Release]) -> tuple[Release, ...]:
    # A stable order makes the serialized document deterministic, so republishing the same set of
    # releases produces the same bytes and hence the same TUF target.
    return tuple(sorted(releases, key=lambda r: (r.image, r.arch, r.version)))


def _release_to_dict(release: Release) -> dict[str, Any]:
    return {
        "image": release.image,
        "arch": release.arch,
        "version": str(release.version),
        "roothash": release.roothash,
        "targets": dict(sorted(release.targets.items())),
        "waves": {str(bound): format_time(start) for bound, start in sorted(release.waves.items())},
        "pulled": release.pulled,
    } | ({} if release.changes is None else {"changes": release.changes.to_dict()})


def format_time(when: datetime) -> str:
    """RFC 3339 in UTC with whole seconds, e.g. 2025-11-22T08:00:00Z."""
    return when.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    """An RFC 3339 time with an explicit offset ("Z" or "+01:00"); naive times are refused."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an RFC 3339 time like 2025-11-22T08:00:00Z") from None
    if when.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone; add 'Z' for UTC")
    return when.astimezone(UTC)


def parse(text: str | bytes, source: str) -> ChannelManifest:
    """Parse a channel manifest; `source` names where it came from in error messages."""
    doc = json_object(text, source, ChannelError)
    _no_unknown(doc, {"channel", "max_version", "releases"}, source)

    channel = doc.get("channel")
    if not isinstance(channel, str) or not CHANNEL_NAME.fullmatch(channel):
        raise ChannelError(
            f"{source}: field 'channel': expected a name of lowercase letters, digits, '.', '_' "
            f"or '-', got {channel!r}"
        )
    raw_max = doc.get("max_version")
    max_version = None if raw_max is None else _version(raw_max, f"{source}: field 'max_version'")
    raw_releases = doc.get("releases")
    if not isinstance(raw_releases, list):
        raise ChannelError(f"{source}: field 'releases': expected a list")
    releases: list[Release] = []
    seen: set[tuple[str, str, Version]] = set()
    for index, raw in enumerate(raw_releases):
        release = _parse_release(raw, f"{source}: field releases[{index}]")
        key = (release.image, release.arch, release.version)
        if key in seen:
            raise ChannelError(
                f"{source}: field releases[{index}]: {release.label} is listed twice"
            )
        seen.add(key)
        releases.append(release)
    return ChannelManifest(channel, max_version, _sorted(releases))


def _no_unknown(doc: Mapping[str, object], known: set[str], where: str) -> None:
    unknown = set(doc) - known
    if unknown:
        raise ChannelError(f"{where}: unknown field(s): {', '.join(sorted(unknown))}")


def _version(value: object, where: str) -> Version:
    if not isinstance(value, str):
        raise ChannelError(f"{where}: expected a version string like 1.2.3, got {value!r}")
    try:
        return Version.parse(value)
    except ValueError as e:
        raise ChannelError(f"{where}: {e}") from None


def _text(doc: Mapping[str, object], key: str, where: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise ChannelError(f"{where}.{key}: expected a non-empty string, got {value!r}")
    return value


def _parse_release(raw: object, where: str) -> Release:
    if not isinstance(raw, dict):
        raise ChannelError(f"{where}: expected an object")
    _no_unknown(
        raw,
        {"image", "arch", "version", "roothash", "targets", "waves", "pulled", "changes"},
        where,
    )
    roothash = _text(raw, "roothash", where)
    if not _HEX64.fullmatch(roothash):
        raise ChannelError(f"{where}.roothash: expected 64 lowercase hex digits")
    pulled = raw.get("pulled", False)
    if not isinstance(pulled, bool):
        raise ChannelError(f"{where}.pulled: expected true or false, got {pulled!r}")
    return Release(
        image=_text(raw, "image", where),
        arch=_text(raw, "arch", where),
        version=_version(raw.get("version"), f"{where}.version"),
        roothash=roothash,
        targets=_parse_targets(raw.get("targets"), f"{where}.targets"),
        waves=parse_waves(raw.get("waves"), f"{where}.waves"),
        pulled=pulled,
        changes=_changes(raw.get("changes"), f"{where}.changes"),
    )


def _changes(raw: object, where: str) -> PackageChanges | None:
    if raw is None:
        return None
    try:
        return PackageChanges.from_dict(raw, where)
    except PackagesError as e:
        raise ChannelError(str(e)) from None


def changes_for(
    channel: ChannelManifest, release: Release, booted: Version
) -> PackageChanges | None:
    """What installing `release` changes on a machine that booted `booted`: the change lists of
    the releases in between, chained (pulled ones count: the lists link through them)."""
    steps = {
        r.version: r.changes
        for r in channel.releases
        if (r.image, r.arch) == (release.image, release.arch) and r.changes is not None
    }
    return compose(booted, steps, release.version)


def _parse_targets(raw: object, where: str) -> Mapping[str, str]:
    if not isinstance(raw, dict):
        raise ChannelError(f"{where}: expected an object mapping file names to target paths")
    missing = [name for name in RELEASE_TARGETS if name not in raw]
    if missing:
        raise ChannelError(f"{where}: missing {', '.join(missing)}")
    _no_unknown(raw, {*RELEASE_TARGETS, *INDEX_TARGETS}, where)
    targets: dict[str, str] = {}
    for name, path in raw.items():
        if not isinstance(path, str) or not is_target_path(path):
            raise ChannelError(
                f"{where}.{name}: expected a relative target path without '.' or '..' parts, "
                f"got {path!r}"
            )
        targets[name] = path
    return MappingProxyType(targets)


def is_target_path(path: str) -> bool:
    parts = path.split("/")
    return all(part not in ("", ".", "..") for part in parts)


def parse_waves(raw: object, where: str) -> Mapping[int, datetime]:
    """Check a wave table: bounds 1..2048, the last one 2048, start times not decreasing."""
    if not isinstance(raw, dict) or not raw:
        raise ChannelError(f"{where}: expected a non-empty object of seed bound -> start time")
    waves: dict[int, datetime] = {}
    for key, value in raw.items():
        # At most 4 digits before int(): 5000 of them would make int() raise.
        digits = isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 4
        bound = int(key) if digits else None
        if bound is None or not 1 <= bound <= SEED_RANGE:
            raise ChannelError(f"{where}: wave bound {key!r}: expected an integer 1..{SEED_RANGE}")
        if not isinstance(value, str):
            raise ChannelError(f"{where}.{key}: expected an RFC 3339 time, got {value!r}")
        try:
            waves[bound] = parse_time(value)
        except ValueError as e:
            raise ChannelError(f"{where}.{key}: {e}") from None
    return check_waves(waves, where)


def check_waves(waves: Mapping[int, datetime], where: str = "waves") -> Mapping[int, datetime]:
    """Validate a wave table built in code the same way a parsed one is."""
    ordered = sorted(waves.items())
    if not ordered or ordered[-1][0] != SEED_RANGE:
        raise ChannelError(
            f"{where}: the last wave must have bound {SEED_RANGE}, or some machines never update"
        )
    for (bound, start), (next_bound, next_start) in itertools.pairwise(ordered):
        if bound < 1:
            raise ChannelError(f"{where}: wave bound {bound}: expected an integer 1..{SEED_RANGE}")
        if next_start < start:
            raise ChannelError(
                f"{where}: wave {next_bound} opens before wave {bound}; later waves must not "
                "open earlier"
            )
    for start in waves.values():
        if start.tzinfo is None:
            raise ChannelError(f"{where}: start time {start} has no time zone")
    return MappingProxyType({b: s.astimezone(UTC).replace(microsecond=0) for b, s in ordered})


def default_waves(now: datetime) -> Mapping[int, datetime]:
    """The default rollout starting at `now`: see DEFAULT_WAVES."""
    return check_waves({bound: now + delay for bound, delay in DEFAULT_WAVES})


def immediate_waves(now: datetime) -> Mapping[int, datetime]:
    """One wave for every machine, open at `now` (`publish --now`)."""
    return check_waves({SEED_RANGE: now})


def machine_seed(machine_id: str) -> int:
    """This machine's rollout seed, 0..2047, stable for the life of /etc/machine-id."""
    digest = app_specific_id(machine_id, _SEED_APP_KEY)
    # 65536 is a multiple of 2048, so the modulo keeps every seed equally likely.
    return int.from_bytes(digest[:2], "big") % SEED_RANGE


def wave_start(release: Release, seed: int) -> datetime:
    """When the wave that covers `seed` opens."""
    if not 0 <= seed < SEED_RANGE:
        raise ValueError(f"seed {seed} is outside 0..{SEED_RANGE - 1}")
    for bound, start in sorted(release.waves.items()):
        if seed < bound:
            return start
    # check_waves guarantees a 2048 bound; a Release built by hand might lack it.
    raise ChannelError(f"{release.label}: no wave covers seed {seed}")


@dataclass(frozen=True)
class Skipped:
    version: Version
    reason: str

    def __str__(self) -> str:
        return f"{self.version}: {self.reason}"


@dataclass(frozen=True)
class Selection:
    """The release to install (or None) and why each other newer release was passed over."""

    release: Release | None
    skipped: tuple[Skipped, ...] = field(default=())

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(str(s) for s in self.skipped)


def _refusal(channel: ChannelManifest, release: Release) -> str | None:
    """Why no machine may install `release` at all, or None."""
    if release.pulled:
        return "pulled"
    if channel.max_version is not None and release.version > channel.max_version:
        return f"above max_version {channel.max_version}"
    return None


def select_candidate(
    channel: ChannelManifest,
    *,
    image: str,
    arch: str,
    booted: Version,
    seed: int,
    now: datetime,
    bad: Collection[Version] = (),
    ignore_waves: bool = False,
) -> Selection:
    """The newest release this machine should install now, if any.

    Candidates are releases of the same image and architecture newer than `booted`, not pulled, at
    most `max_version`, not marked bad on this machine, and whose wave for `seed` has opened
    (unless `ignore_waves`, for canaries). Other images and architectures are not mentioned.
    """
    newer = sorted(
        (r for r in channel.releases if r.image == image and r.arch == arch and r.version > booted),
        key=lambda r: r.version,
        reverse=True,
    )
    skipped: list[Skipped] = []
    for release in newer:
        reason = _refusal(channel, release)
        if reason is None and release.version in bad:
            reason = "marked bad on this machine"
        if reason is None and not ignore_waves:
            start = wave_start(release, seed)
            if start > now:
                reason = f"wave opens for seed {seed} at {format_time(start)}"
        if reason is None:
            return Selection(release, tuple(skipped))
        skipped.append(Skipped(release.version, reason))
    return Selection(None, tuple(skipped))


def select_version(
    channel: ChannelManifest,
    version: Version,
    *,
    image: str,
    arch: str,
    booted: Version,
    allow_downgrade: bool = False,
) -> Selection:
    """A release the operator asked for by version.

    An explicit request skips the waves and a "bad" mark (it is not an automatic retry), but a
    pulled release or one above max_version stays refused: those are the publisher's decisions.
    Going back to an older version needs `allow_downgrade`.
    """
    release = channel.find(image, arch, version)
    if release is None:
        where = f"not in channel {channel.channel} for {image} ({arch})"
        return Selection(None, (Skipped(version, where),))
    reason = _refusal(channel, release)
    if reason is None and version == booted:
        reason = "already booted"
    if reason is None and version < booted and not allow_downgrade:
        reason = f"older than the booted {booted}; pass --allow-downgrade to install it"
    if reason is not None:
        return Selection(None, (Skipped(release.version, reason),))
    return Selection(release)
