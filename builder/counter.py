"""The build counter: each build's default version, YYYY.(MM*100+DD).N, per output directory."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

from builder.lock import exclusive
from updater.files import write_file_atomic
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
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, -1
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: not valid JSON ({error}); delete it to restart the count"
        ) from None
    # Restarting silently from 0 could hand out a version that was already built today.
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("date"), str)
        or not isinstance(data.get("count"), int)
        or isinstance(data.get("count"), bool)
        or data["count"] < 0
    ):
        raise ValueError(
            f'{path}: expected {{"date": "YYYY-MM-DD", "count": N}}, got {text.strip()!r}; '
            "delete it to restart the count"
        )
    return data["date"], data["count"]
