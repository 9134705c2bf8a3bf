"""Version parsing and ordering, and the date-derived build counter."""

from __future__ import annotations

import argparse
import json
import re
from datetime import date
from pathlib import Path

import pytest

from builder.counter import COUNTER_FILE, default_version
from updater.release.version import Version, version_argument


def test_parse_and_str_round_trip() -> None:
    version = Version.parse("2025.1122.7")
    assert version == Version(2025, 1122, 7)
    assert str(version) == "2025.1122.7"
    assert str(Version.parse("0.0.0")) == "0.0.0"


def test_ordering_is_numeric_not_textual() -> None:
    assert Version.parse("1.10.0") > Version.parse("1.9.0")
    assert Version.parse("1.2.10") > Version.parse("1.2.9")
    assert Version.parse("10.0.0") > Version.parse("9.99.99")
    texts = ["1.10.0", "1.9.0", "1.9.10", "0.1.0", "1.9.2", "2.0.0"]
    ordered = [str(v) for v in sorted(Version.parse(t) for t in texts)]
    assert ordered == ["0.1.0", "1.9.0", "1.9.2", "1.9.10", "1.10.0", "2.0.0"]


def test_versions_are_hashable_and_equal_by_value() -> None:
    assert len({Version.parse("1.2.3"), Version(1, 2, 3)}) == 1


@pytest.mark.parametrize(
    "text",
    [
        "1.2",
        "1.2.3.4",
        "",
        "01.2.3",
        "1.02.3",
        "1.2.03",
        "1.2.-3",
        "a.b.c",
        " 1.2.3",
        "1.2.3\n",
        "1..3",
        "v1.2.3",
        "1.2.3-rc1",
        "١.2.3",
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not MAJOR\.MINOR\.PATCH") as info:
        Version.parse(text)
    assert repr(text) in str(info.value)


def test_parse_error_message_quotes_the_input() -> None:
    with pytest.raises(ValueError, match=r"^version '1\.2' is not MAJOR\.MINOR\.PATCH"):
        Version.parse("1.2")


def test_a_part_of_thousands_of_digits_is_no_version() -> None:
    # int() of 5000 digits raises its own ValueError; the version's message says what is wrong.
    with pytest.raises(ValueError, match=r"is not MAJOR\.MINOR\.PATCH \(three non-negative"):
        Version.parse("1." + "9" * 5000 + ".0")
    assert Version.parse("1.999999999999999999.0").minor == 10**18 - 1
    with pytest.raises(ValueError, match=r"at most 18 digits"):
        Version.parse("1.9999999999999999999.0")


def test_parse_rejects_non_string() -> None:
    with pytest.raises(ValueError, match=r"is not MAJOR\.MINOR\.PATCH"):
        Version.parse(1.2)  # type: ignore[arg-type]


@pytest.mark.parametrize("parts", [(-1, 0, 0), (1, True, 0), (1, 2, 3.0)])
def test_constructor_rejects_bad_parts(parts: tuple[object, object, object]) -> None:
    with pytest.raises(ValueError, match="non-negative integer"):
        Version(*parts)  # type: ignore[arg-type]


def test_default_version_counts_builds_per_day(tmp_path: Path) -> None:
    out = tmp_path / "out"
    day = date(2025, 11, 22)
    assert default_version(out, day) == Version(2025, 1122, 0)
    assert default_version(out, day) == Version(2025, 1122, 1)
    assert default_version(out, day) == Version(2025, 1122, 2)
    assert json.loads((out / COUNTER_FILE).read_text()) == {"date": "2025-11-22", "count": 2}
    # A new day restarts the count, and still sorts after every build of the day before.
    next_day = default_version(out, date(2025, 11, 23))
    assert next_day == Version(2025, 1123, 0)
    assert next_day > Version(2025, 1122, 2)


def test_default_version_minor_has_no_leading_zero(tmp_path: Path) -> None:
    version = default_version(tmp_path, date(2026, 1, 1))
    assert str(version) == "2026.101.0"
    assert Version.parse(str(version)) == version
    assert default_version(tmp_path, date(2026, 1, 10)) > Version.parse("2026.109.5")


def test_default_version_leaves_no_temporary_files(tmp_path: Path) -> None:
    for _ in range(3):
        default_version(tmp_path, date(2025, 11, 22))
    assert sorted(p.name for p in tmp_path.iterdir()) == [COUNTER_FILE, ".build-counter.lock"]


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        '{"date": "2025-11-22"}',
        '{"date": "2025-11-22", "count": -1}',
        # Bytes and numbers no reader takes: refusals naming the file, not a crash.
        '{"date": "2025-11-22\xff", "count": 1}',
        '{"date": "2025-11-22", "count": ' + "9" * 5000 + "}",
        '{"date": "2025-11-22", "count": 999999999999999999}',
        '{"date": "2025-11-22", "x": ' + "[" * 5000 + "]" * 5000 + "}",
    ],
)
def test_default_version_refuses_corrupt_counter(tmp_path: Path, content: str) -> None:
    data = content.encode("latin-1")
    (tmp_path / COUNTER_FILE).write_bytes(data)
    with pytest.raises(ValueError, match=re.escape(COUNTER_FILE)):
        default_version(tmp_path, date(2025, 11, 22))
    assert (tmp_path / COUNTER_FILE).read_bytes() == data


def test_version_argument_reports_what_a_version_looks_like() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--version", type=version_argument)
    assert parser.parse_args(["--version", "1.10.0"]).version == Version(1, 10, 0)
    with pytest.raises(argparse.ArgumentTypeError, match=r"'1\.2' is not MAJOR\.MINOR\.PATCH"):
        version_argument("1.2")
