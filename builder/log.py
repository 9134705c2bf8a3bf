"""Logging, timed build steps and progress output.

On a terminal progress is a redrawn bar; in CI logs (no TTY, or CI set) it is plain lines, at most
one per ten percent, so logs stay readable.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator

_depth = 0
_timings: list[tuple[str, float]] = []


def interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


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


class Progress:
    """Progress of work with a known total (bytes or items)."""

    def __init__(self, label: str, total: int, unit: str = "B") -> None:
        self.label = label
        self.total = max(total, 1)
        self.unit = unit
        self.done = 0
        self._last_decile = -1
        self._tty = interactive()

    def _fmt(self, n: int) -> str:
        if self.unit == "B":
            return f"{n / 1e6:.1f} MB"
        return f"{n} {self.unit}"

    def update(self, amount: int) -> None:
        self.done += amount
        fraction = min(self.done / self.total, 1.0)
        if self._tty:
            width = 30
            filled = int(width * fraction)
            bar = "█" * filled + "·" * (width - filled)
            sys.stderr.write(
                f"\r{'  ' * _depth}{self.label} [{bar}] {fraction:4.0%} "
                f"{self._fmt(self.done)}/{self._fmt(self.total)}"
            )
            sys.stderr.flush()
        else:
            decile = int(fraction * 10)
            if decile != self._last_decile:
                self._last_decile = decile
                done, total = self._fmt(self.done), self._fmt(self.total)
                log(f"{self.label}: {fraction:.0%} ({done} of {total})")

    def close(self) -> None:
        if self._tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
