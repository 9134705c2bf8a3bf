"""Release versions, MAJOR.MINOR.PATCH compared numerically; shared by the builder and the agent.

Stdlib only: this module runs on the device with the image's own Python.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from updater import files

# [0-9] rather than \d: \d also accepts non-ASCII digits, which int() would happily convert.
_VERSION_RE = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")

COUNTER_FILE = ".build-counter.json"
_LOCK_FILE = ".build-counter.lock"


@dataclass(frozen=True, order=True)
class Version:
    """A release version; field order makes comparison numeric, so 1.10.0 > 1.9.0."""

    major: int
    minor: int
    patch: int

    def __post_init__(self) -> None:
        for name in ("major", "minor", "patch"):
            value = getattr(self, name)
            # bool is an int subclass; Version(True, 0, 0) is a bug, not version 1.0.0.
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"version {name} must be a non-negative integer, got {value!r}")

    @classmethod
    def parse(cls, text: str) -> Version:
        """Parse "MAJOR.MINOR.PATCH"; anything else (leading zeros, spaces, 2 or 4 parts) fails."""
        match = _VERSION_RE.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(
                f"version {text!r} is not MAJOR.MINOR.PATCH "
                "(three non-negative integers without leading zeros, like 2025.1122.0)"
            )
        major, minor, patch = (int(part) for part in match.groups())
        return cls(major, minor, patch)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


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
    with _locked(counter_dir / _LOCK_FILE):
        last_day, last_count = _read_counter(path)
        count = last_count + 1 if last_day == day.isoformat() else 0
        files.write_file_atomic(
            path, (json.dumps({"date": day.isoformat(), "count": count}) + "\n").encode()
        )
    return Version(day.year, day.month * 100 + day.day, count)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    # A separate lock file: the counter file itself is replaced, so a lock on it would not hold.
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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
