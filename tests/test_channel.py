"""Channel manifests: format, waves, candidate selection and machine seeds."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from updater.release import channel as ch
from updater.release.channel import ChannelError, ChannelManifest, Release
from updater.release.version import Version

T0 = datetime(2025, 11, 22, 8, 0, tzinfo=UTC)
HASH = "ab" * 32


def release(version: str, **changes: Any) -> Release:
    base = Release(
        image="containerhost",
        arch="x86_64",
        version=Version.parse(version),
        roothash=HASH,
        targets={name: f"containerhost/{version}/{name}" for name in ch.RELEASE_TARGETS},
        waves=ch.immediate_waves(T0),
    )
    return replace(base, **changes)


def doc(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(ChannelManifest("stable", None, (release("1.2.3"),)).to_json())
    raw.update(changes)
    return raw


def test_round_trip_is_stable() -> None:
    manifest = ChannelManifest(
        "stable",
        Version.parse("2.0.0"),
        (
            release("1.3.0", waves=ch.default_waves(T0), pulled=True),
            release("1.2.3"),
            release("1.2.3", arch="aarch64"),
        ),
    )
    text = manifest.to_json()
    parsed = ch.parse(text, "stable.json")
    assert parsed == manifest.with_release(release("1.2.3"))  # sorted on the way out
    assert parsed.to_json() == text
    raw = json.loads(text)
    assert raw["max_version"] == "2.0.0"
    assert raw["releases"][-1]["waves"]["102"] == "2025-11-22T08:00:00Z"
    assert [r["version"] for r in raw["releases"]] == ["1.2.3", "1.2.3", "1.3.0"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"channel": "Stable!"}, "field 'channel'"),
        ({"max_version": "2.0"}, "field 'max_version'"),
        ({"releases": {}}, "field 'releases': expected a list"),
        ({"extra": 1}, "unknown field(s): extra"),
    ],
)
def test_top_level_errors_name_the_field(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ChannelError, match=r"^chan\.json: ") as error:
        ch.parse(json.dumps(doc(**changes)), "chan.json")
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("roothash", "xyz", "releases[0].roothash: expected 64 lowercase hex"),
        ("version", "1.2", "releases[0].version"),
        ("pulled", "no", "releases[0].pulled: expected true or false"),
        ("image", "", "releases[0].image: expected a non-empty string"),
        ("targets", {"root.erofs": "a"}, "releases[0].targets: missing root.verity"),
        ("waves", {}, "releases[0].waves: expected a non-empty object"),
        ("waves", {"0": "2025-11-22T08:00:00Z"}, "wave bound '0'"),
        ("waves", {"2049": "2025-11-22T08:00:00Z"}, "wave bound '2049'"),
        ("waves", {"100": "2025-11-22T08:00:00Z"}, "the last wave must have bound 2048"),
        ("waves", {"2048": "2025-11-22T08:00:00"}, "has no time zone"),
        ("waves", {"2048": "tomorrow"}, "not an RFC 3339 time"),
        (
            "waves",
            {"100": "2025-11-23T08:00:00Z", "2048": "2025-11-22T08:00:00Z"},
            "wave 2048 opens before wave 100",
        ),
    ],
)
def test_release_errors_name_the_field(field: str, value: object, message: str) -> None:
    raw = doc()
    raw["releases"][0][field] = value
    with pytest.raises(ChannelError, match=r"^chan\.json: ") as error:
        ch.parse(json.dumps(raw), "chan.json")
    assert message in str(error.value)


def test_target_paths_cannot_escape() -> None:
    raw = doc()
    raw["releases"][0]["targets"]["uki.efi"] = "../../etc/passwd"
    with pytest.raises(ChannelError, match=r"targets\.uki\.efi: expected a relative target path"):
        ch.parse(json.dumps(raw), "chan.json")


def test_duplicate_release_refused() -> None:
    raw = doc()
    raw["releases"].append(raw["releases"][0])
    with pytest.raises(ChannelError, match=r"releases\[1\].*listed twice"):
        ch.parse(json.dumps(raw), "chan.json")


def test_not_json() -> None:
    with pytest.raises(ChannelError, match=r"^chan\.json: not valid JSON"):
        ch.parse("{", "chan.json")


def test_default_waves_schedule() -> None:
    waves = ch.default_waves(T0)
    assert {b: s - T0 for b, s in waves.items()} == {
        102: timedelta(0),
        512: timedelta(hours=4),
        1024: timedelta(hours=12),
        2048: timedelta(hours=24),
    }
    rel = release("1.3.0", waves=waves)
    assert ch.wave_start(rel, 0) == T0
    assert ch.wave_start(rel, 101) == T0
    assert ch.wave_start(rel, 102) == T0 + timedelta(hours=4)
    assert ch.wave_start(rel, 2047) == T0 + timedelta(hours=24)
    assert ch.wave_start(rel, 1500) > T0 + timedelta(hours=23)
    assert ch.wave_start(rel, 1500) <= T0 + timedelta(hours=24)
    with pytest.raises(ValueError, match="outside"):
        ch.wave_start(rel, 2048)


def test_immediate_waves_open_for_everyone() -> None:
    rel = release("1.3.0", waves=ch.immediate_waves(T0))
    assert all(ch.wave_start(rel, seed) <= T0 for seed in (0, 1024, 2047))


def select(manifest: ChannelManifest, **options: Any) -> ch.Selection:
    defaults: dict[str, Any] = {
        "image": "containerhost",
        "arch": "x86_64",
        "booted": Version.parse("1.2.0"),
        "seed": 1500,
        "now": T0,
    }
    return ch.select_candidate(manifest, **{**defaults, **options})


def test_selects_newest_eligible_and_explains_each_skip() -> None:
    manifest = ChannelManifest(
        "stable",
        Version.parse("1.3.9"),
        (
            release("1.1.0"),
            release("1.2.0"),
            release("1.2.4"),
            release("1.2.5", waves=ch.default_waves(T0)),
            release("1.3.0", pulled=True),
            release("1.3.1"),
            release("1.4.0"),
            release("1.9.0", image="other"),
            release("1.9.0", arch="aarch64"),
        ),
    )
    result = select(manifest, bad=[Version.parse("1.3.1")])
    assert result.release == release("1.2.4")
    assert result.reasons == (
        "1.4.0: above max_version 1.3.9",
        "1.3.1: marked bad on this machine",
        "1.3.0: pulled",
        "1.2.5: wave opens for seed 1500 at 2025-11-23T08:00:00Z",
    )
    # A canary ignores waves but nothing else.
    assert select(manifest, bad=[Version.parse("1.3.1")], ignore_waves=True).release == release(
        "1.2.5", waves=ch.default_waves(T0)
    )
    # A low seed is in the first wave.
    assert select(manifest, bad=[Version.parse("1.3.1")], seed=5).release == release(
        "1.2.5", waves=ch.default_waves(T0)
    )


def test_nothing_newer_selects_nothing() -> None:
    manifest = ChannelManifest("stable", None, (release("1.2.0"), release("1.1.0")))
    result = select(manifest)
    assert result.release is None
    assert result.skipped == ()


def test_select_version() -> None:
    manifest = ChannelManifest(
        "stable",
        Version.parse("1.3.0"),
        (release("1.1.0"), release("1.2.0"), release("1.2.5", pulled=True), release("1.4.0")),
    )
    common: dict[str, Any] = {"image": "containerhost", "arch": "x86_64"}
    booted = Version.parse("1.2.0")

    def pick(version: str, **options: Any) -> ch.Selection:
        return ch.select_version(
            manifest, Version.parse(version), booted=booted, **common, **options
        )

    assert pick("1.1.0").reasons == (
        "1.1.0: older than the booted 1.2.0; pass --allow-downgrade to install it",
    )
    assert pick("1.1.0", allow_downgrade=True).release == release("1.1.0")
    assert pick("1.2.0").reasons == ("1.2.0: already booted",)
    assert pick("1.2.5").reasons == ("1.2.5: pulled",)
    assert pick("1.4.0").reasons == ("1.4.0: above max_version 1.3.0",)
    assert pick("1.0.0").reasons == ("1.0.0: not in channel stable for containerhost (x86_64)",)


def test_machine_seed_is_stable_and_in_range() -> None:
    machine_id = "0123456789abcdef0123456789abcdef"
    assert ch.machine_seed(machine_id) == ch.machine_seed(machine_id + "\n")
    # A fixed value: the derivation must never change, or a fleet's waves reshuffle on update.
    assert ch.machine_seed(machine_id) == 135
    seeds = [ch.machine_seed(f"{i:032x}") for i in range(4096)]
    assert all(0 <= s < 2048 for s in seeds)
    # Roughly uniform: every eighth of the range gets a fair share of 4096 machines.
    buckets = Counter(s // 256 for s in seeds)
    assert len(buckets) == 8 and min(buckets.values()) > 350
    with pytest.raises(ValueError, match="32 lowercase hex"):
        ch.machine_seed("not-a-machine-id")
