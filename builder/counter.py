"""The build counter: each build's default version, YYYY.(MM*100+DD).N, per output directory."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

from builder.lock import exclusive
from updater.files import write_file_atomic
from updater.limits import MAX_DIGITS
from updater.release.document import json_object
from updater.release.version import Version

COUNTER_FILE = ".build-counter.json"
_LOCK_FILE = ".build-counter.lock"


def default_version(counter_dir: Path, today: date | None = None) -> Version:
    """The next date-derived build version: YYYY.(MM*100+DD).N, N counting builds of the day.

    MINOR is a plain integer (1122 for 22 November, 101 for 1 January) so that no part needs a
    leading zero and versions of later days always compare greater. N starts at 0 each day and is
    kept in `counter_dir/.build-counter.json`.
    """
    day = today if today is not None else date.today()
    counter_dir.mkdir(parents=True, exist_ok=True)
    path = counter_dir / COUNTER_FILE
    # Two builds sharing an output directory must not both get the same N.
    with exclusive(counter_dir / _LOCK_FILE):
        last_day, last_count = _read_counter(path)
        count = last_count + 1 if last_day == day.isoformat() else 0
        write_file_atomic(
            path, (json.dumps({"date": day.isoformat(), "count": count}) + "\n").encode()
        )
    return Version(day.year, day.month * 100 + day.day, count)


def _read_counter(path: Path) -> tuple[str | None, int]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, -1
    # The agent's JSON reader: not UTF-8, nested too deeply or a 5000-digit count is a
    # ValueError naming the file too.
    data = json_object(raw, f"{path} (delete it to restart the count)", ValueError)
    # Restarting silently from 0 could hand out a version that was already built today.
    count = data.get("count")
    if (
        not isinstance(data.get("date"), str)
        or not isinstance(count, int)
        or isinstance(count, bool)
        or not 0 <= count < 10**MAX_DIGITS - 1  # the next one is still a version part
    ):
        shown = raw.decode(errors="replace").strip()
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise ValueError(
            f'{path}: expected {{"date": "YYYY-MM-DD", "count": N}}, got {shown!r}; '
            "delete it to restart the count"
        )
    return data["date"], count
