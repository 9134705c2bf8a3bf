"""Logging and timed build steps: a step logs its start and its duration, nested steps indented."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

_depth = 0
_timings: list[tuple[str, float]] = []


def log(message: str) -> None:
    print(f"{'  ' * _depth}{message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    log(f"WARNING: {message}")


@contextlib.contextmanager
def complete_step(title: str) -> Iterator[None]:
    """Log a step's start and its duration; nested steps are indented."""
    global _depth
    log(f"‣ {title}")
    start = time.monotonic()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        elapsed = time.monotonic() - start
        _timings.append((title, elapsed))
        log(f"  {title}: {elapsed:.1f}s")


def timings() -> list[tuple[str, float]]:
    """Every completed step with its duration, in completion order."""
    return list(_timings)
