"""Maintenance windows (updater.reboot.windows): week wrap-around and both DST directions in two
zones."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from updater.reboot.windows import Schedule, parse_window


def schedule(days: list[str], start: str, length: int, tz: str = "UTC") -> Schedule:
    raw = {"days": days, "start_time": start, "length_minutes": length, "time_zone": tz}
    return Schedule((parse_window(raw),))


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def test_a_window_across_sunday_midnight_wraps_into_monday() -> None:
    s = schedule(["Sun"], "23:30", 60)
    # 2026-11-22 is a Sunday.
    assert not s.contains(utc(2026, 11, 22, 23, 29))
    assert s.contains(utc(2026, 11, 22, 23, 30))
    assert s.contains(utc(2026, 11, 23, 0, 29))  # Monday, still inside
    assert not s.contains(utc(2026, 11, 23, 0, 30))
    assert s.next_open(utc(2026, 11, 23, 0, 30)) == utc(2026, 11, 29, 23, 30)
    assert s.next_open(utc(2026, 11, 23, 0, 10)) == utc(2026, 11, 23, 0, 10)  # open: now


def test_several_days_and_the_nearest_opening() -> None:
    s = Schedule(
        (
            parse_window(
                {"days": ["saturday", "Sun"], "start_time": "02:00", "length_minutes": 30}
            ),
            parse_window({"days": ["Wed"], "start_time": "01:00", "length_minutes": 30}),
        )
    )
    assert s.next_open(utc(2026, 11, 23, 12)) == utc(2026, 11, 25, 1)  # Monday -> Wednesday
    assert s.next_open(utc(2026, 11, 25, 2)) == utc(2026, 11, 28, 2)  # -> Saturday
    assert s.next_open(utc(2026, 11, 28, 2, 30)) == utc(2026, 11, 29, 2)  # -> Sunday


def test_a_whole_week_window_is_always_open() -> None:
    s = schedule(["Mon"], "00:00", 7 * 24 * 60)
    assert all(s.contains(utc(2026, 11, 23 + d, h)) for d in range(7) for h in range(0, 24, 5))


def test_berlin_fall_back_repeats_the_hour_and_the_window_grows() -> None:
    # 2026-10-25: 03:00 CEST becomes 02:00 CET, so 02:00-03:00 happens twice (00:00-02:00 UTC).
    s = schedule(["Sun"], "02:00", 60, "Europe/Berlin")
    assert not s.contains(utc(2026, 10, 24, 23, 59))
    assert s.contains(utc(2026, 10, 25, 0, 0))  # 02:00 CEST
    assert s.contains(utc(2026, 10, 25, 1, 30))  # 02:30 CET, the second time round
    assert not s.contains(utc(2026, 10, 25, 2, 0))  # 03:00 CET
    assert s.next_open(utc(2026, 10, 24, 12)) == utc(2026, 10, 25, 0, 0)
    # A week later, plain CET: 02:00 local is 01:00 UTC.
    assert s.next_open(utc(2026, 10, 25, 2)) == utc(2026, 11, 1, 1, 0)


def test_berlin_spring_forward_skips_or_shortens_the_window() -> None:
    # 2026-03-29: 02:00 CET becomes 03:00 CEST; 02:00-03:00 never happens.
    skipped = schedule(["Sun"], "02:00", 30, "Europe/Berlin")
    assert skipped.next_open(utc(2026, 3, 28, 12)) == utc(2026, 4, 5, 0, 0)  # next Sunday, CEST
    across = schedule(["Sun"], "02:15", 60, "Europe/Berlin")  # 02:15-03:15: only 03:00-03:15
    assert across.next_open(utc(2026, 3, 28, 12)) == utc(2026, 3, 29, 1, 0)  # 03:00 CEST
    assert across.contains(utc(2026, 3, 29, 1, 14)) and not across.contains(utc(2026, 3, 29, 1, 15))
    before = schedule(["Sun"], "01:30", 60, "Europe/Berlin")  # 01:30-02:30: only 01:30-02:00
    assert before.contains(utc(2026, 3, 29, 0, 59)) and not before.contains(utc(2026, 3, 29, 1, 0))


def test_new_york_fall_back_closes_and_reopens_the_window() -> None:
    # 2026-11-01: 02:00 EDT becomes 01:00 EST. Window 01:30-02:30 local: 01:30-02:00 EDT
    # (05:30-06:00 UTC), then the clock reads 01:00 EST (closed), 01:30-02:30 EST (06:30-07:30).
    s = schedule(["Sunday"], "01:30", 60, "America/New_York")
    assert s.next_open(utc(2026, 10, 31, 12)) == utc(2026, 11, 1, 5, 30)
    assert s.contains(utc(2026, 11, 1, 5, 59))
    assert not s.contains(utc(2026, 11, 1, 6, 10))
    assert s.next_open(utc(2026, 11, 1, 6, 10)) == utc(2026, 11, 1, 6, 30)  # the repeated 01:30
    assert s.contains(utc(2026, 11, 1, 7, 29)) and not s.contains(utc(2026, 11, 1, 7, 30))


def test_new_york_spring_forward_skips_a_window_inside_the_gap() -> None:
    # 2026-03-08: 02:00 EST becomes 03:00 EDT.
    s = schedule(["Sun"], "02:30", 15, "America/New_York")
    assert s.next_open(utc(2026, 3, 7, 12)) == utc(2026, 3, 15, 6, 30)  # 02:30 EDT a week later
    assert s.next_open(utc(2026, 3, 1, 0)) == utc(2026, 3, 1, 7, 30)  # the week before: EST
    assert s.next_open(utc(2026, 3, 1, 12)) == utc(2026, 3, 15, 6, 30)  # 03-08 never comes


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"days": [], "start_time": "01:00", "length_minutes": 5}, "key 'days': expected a list"),
        ({"days": ["Funday"], "start_time": "01:00", "length_minutes": 5}, "'Funday' is not a"),
        ({"days": ["Mon"], "start_time": "24:00", "length_minutes": 5}, "key 'start_time'"),
        ({"days": ["Mon"], "start_time": "1:00", "length_minutes": 5}, "key 'start_time'"),
        ({"days": ["Mon"], "start_time": "01:00", "length_minutes": 0}, "key 'length_minutes'"),
        ({"days": ["Mon"], "start_time": "01:00", "length_minutes": 10081}, "1..10080"),
        ({"days": ["Mon"], "start_time": "01:00"}, "key 'length_minutes' is missing"),
        (
            {"days": ["Mon"], "start_time": "01:00", "length_minutes": 5, "time_zone": "Mars/Base"},
            "key 'time_zone': unknown time zone 'Mars/Base'",
        ),
        ({"days": ["Mon"], "start_time": "01:00", "length_minutes": 5, "tz": "UTC"}, "unknown key"),
    ],
)
def test_malformed_windows_say_which_key(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_window(raw)
