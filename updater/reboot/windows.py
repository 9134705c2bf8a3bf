"""Maintenance windows: weekly wall-clock periods in which the `window` strategy may reboot.

    [[window]]
    days = ["Sat", "Sun"]        # weekday names, full or three letters, any case
    start_time = "23:30"         # hh:mm, wall clock in time_zone
    length_minutes = 60          # 1 .. 10080 (a week); may run past midnight and past Sunday
    time_zone = "Europe/Berlin"  # an IANA name, "localtime" (/etc/localtime) or "UTC" (default)

Zincati's `periodic` strategy has the same keys and the same meaning, so a window written for
Fedora CoreOS reads the same here (Zincati takes one time zone for all windows; Berth one per
window).

Daylight saving time: the wall clock is obeyed, as in Zincati. A moment is inside a window when
its local wall-clock time is, so on the day clocks go back the repeated hour counts twice (a
window over it grows by an hour) and on the day they go forward the skipped hour never happens
(a window inside it is skipped, one across it shrinks). `next_open` knows both: it finds the
first real moment whose wall-clock time is inside, including a moment right after a transition.

Standard library only (zoneinfo with the system's tzdata): this runs on the device's own Python.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

MINUTES_PER_DAY = 24 * 60
MINUTES_PER_WEEK = 7 * MINUTES_PER_DAY
LOCALTIME = Path("/etc/localtime")
ZONEINFO = Path("/usr/share/zoneinfo")
_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_START = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
# Far enough to see every window at least once even when DST skips one occurrence.
_HORIZON = timedelta(days=15)


@functools.cache
def zone(name: str, localtime: Path = LOCALTIME) -> tzinfo:
    """The time zone `name`: an IANA name, "UTC", or "localtime" for /etc/localtime.

    Raises ValueError for an unknown name. A missing /etc/localtime is UTC (as for Zincati and
    glibc). Cached: a window is checked often and the answer does not change while it runs.
    """
    if name == "localtime":
        if not localtime.exists():
            return UTC
        target = localtime.resolve()
        try:
            return ZoneInfo(str(target.relative_to(ZONEINFO.resolve())))
        except (ValueError, ZoneInfoNotFoundError):
            with target.open("rb") as f:
                return ZoneInfo.from_file(f, key="localtime")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r} (expected an IANA name like Europe/Berlin, "
            '"UTC" or "localtime")'
        ) from None


@dataclass(frozen=True)
class Window:
    """One weekly window: on each of `days` (0 = Monday) from `start` for `length` minutes."""

    days: frozenset[int]
    start: int  # minutes after local midnight
    length: int  # minutes
    time_zone: str = "UTC"

    @property
    def tz(self) -> tzinfo:
        return zone(self.time_zone)

    def _wall_minute(self, when: datetime) -> float:
        """Minutes since Monday 00:00 of the wall clock at `when` in this window's zone."""
        local = when.astimezone(self.tz)
        return (
            local.weekday() * MINUTES_PER_DAY
            + local.hour * 60
            + local.minute
            + (local.second + local.microsecond / 1e6) / 60
        )

    def contains(self, when: datetime) -> bool:
        minute = self._wall_minute(when)
        return any(
            (minute - (day * MINUTES_PER_DAY + self.start)) % MINUTES_PER_WEEK < self.length
            for day in self.days
        )

    def _starts(self, after: datetime) -> Iterator[datetime]:
        """Each wall-clock start from the day before `after` on, as real moments (both readings
        of a repeated time; a skipped time resolves to a moment that `contains` then rejects)."""
        first = after.astimezone(self.tz).date() - timedelta(days=1)
        clock = time(self.start // 60, self.start % 60)
        for offset in range(_HORIZON.days + 2):
            day = first + timedelta(days=offset)
            if day.weekday() in self.days:
                wall = datetime.combine(day, clock)
                for fold in (0, 1):
                    yield wall.replace(tzinfo=self.tz, fold=fold).astimezone(UTC)

    def __str__(self) -> str:
        names = ",".join(_DAYS[d][:3].capitalize() for d in sorted(self.days))
        return (
            f"{names} {self.start // 60:02d}:{self.start % 60:02d} for {self.length} min "
            f"({self.time_zone})"
        )


def _transitions(tz: tzinfo, start: datetime, end: datetime) -> Iterator[datetime]:
    """Moments in [start, end) where `tz` changes its UTC offset, to the minute."""
    step = timedelta(hours=1)
    t = start
    while t < end:
        before = t.astimezone(tz).utcoffset()
        if before != (t + step).astimezone(tz).utcoffset():
            low, high = 0, 60  # minutes after t: same offset at low, the new one at high
            while high - low > 1:
                mid = (low + high) // 2
                if (t + timedelta(minutes=mid)).astimezone(tz).utcoffset() == before:
                    low = mid
                else:
                    high = mid
            yield t + timedelta(minutes=high)
        t += step


@dataclass(frozen=True)
class Schedule:
    """All configured windows; a reboot may happen when any of them is open."""

    windows: tuple[Window, ...]

    def contains(self, when: datetime) -> bool:
        return any(w.contains(when) for w in self.windows)

    def next_open(self, now: datetime) -> datetime:
        """`now` when a window is open, else the first later moment at which one is.

        Raises ValueError when no window opens within two weeks (no windows at all, or a zone
        whose rules skip every occurrence).
        """
        if self.contains(now):
            return now
        now = now.astimezone(UTC)
        end = now + _HORIZON
        candidates: list[datetime] = []
        for window in self.windows:
            candidates.extend(t for t in window._starts(now) if now < t < end)
        for tz_ in {w.tz for w in self.windows}:
            # A window can also open when the clock jumps into it: forward past a skipped start,
            # or back into a repeated hour.
            start = now.replace(minute=0, second=0, microsecond=0)
            candidates.extend(t for t in _transitions(tz_, start, end) if t > now)
        opening = [t for t in sorted(candidates) if self.contains(t)]
        if not opening:
            raise ValueError(f"no maintenance window opens between {now} and {end}")
        return opening[0]


def parse_window(raw: object, localtime: Path = LOCALTIME) -> Window:
    """One `[[window]]` table; ValueError names the key and what was expected."""
    if not isinstance(raw, Mapping):
        raise ValueError("expected a table with days, start_time and length_minutes")
    known = {"days", "start_time", "length_minutes", "time_zone"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
    missing = [k for k in ("days", "start_time", "length_minutes") if k not in raw]
    if missing:
        raise ValueError(f"key '{missing[0]}' is missing")
    days = _days(raw["days"])
    start = raw["start_time"]
    match = _START.fullmatch(start) if isinstance(start, str) else None
    if match is None:
        raise ValueError(f"key 'start_time': expected hh:mm like \"23:30\", got {start!r}")
    length = raw["length_minutes"]
    if (
        not isinstance(length, int)
        or isinstance(length, bool)
        or not 1 <= length <= MINUTES_PER_WEEK
    ):
        raise ValueError(
            f"key 'length_minutes': expected whole minutes 1..{MINUTES_PER_WEEK}, got {length!r}"
        )
    tz_name = raw.get("time_zone", "UTC")
    if not isinstance(tz_name, str):
        raise ValueError(f"key 'time_zone': expected a string, got {tz_name!r}")
    try:
        zone(tz_name, localtime)
    except ValueError as e:
        raise ValueError(f"key 'time_zone': {e}") from None
    except OSError as e:
        raise ValueError(f"key 'time_zone': cannot read {localtime}: {e}") from None
    return Window(days, int(match[1]) * 60 + int(match[2]), length, tz_name)


def _days(raw: object) -> frozenset[int]:
    if not isinstance(raw, list) or not raw:
        raise ValueError(
            f'key \'days\': expected a list of weekdays like ["Sat", "Sun"], got {raw!r}'
        )
    days: set[int] = set()
    for item in raw:
        name = item.lower() if isinstance(item, str) else None
        found = [i for i, d in enumerate(_DAYS) if name in (d, d[:3])]
        if not found:
            raise ValueError(f"key 'days': {item!r} is not a weekday (Mon..Sun or Monday..Sunday)")
        days.add(found[0])
    return frozenset(days)
