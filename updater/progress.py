"""Download progress for the command line: a redrawn bar on a terminal, plain lines otherwise.

Plain lines (a journal, a CI log, a pipe) come at most once per ten percent so logs stay short.
"""

from __future__ import annotations

from typing import TextIO


class Progress:
    """Progress of the payload files of one update, reported as (name, done, total)."""

    def __init__(self, stream: TextIO, *, tty: bool | None = None, width: int = 30) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.width = width
        self._name: str | None = None
        self._decile = -1

    def __call__(self, name: str, done: int, total: int, reused: int = 0) -> None:
        """`done` bytes of `total` are in place, `reused` of them copied from this machine's
        own disk rather than fetched."""
        if name != self._name:
            self.close()
            self._name, self._decile = name, -1
        fraction = min(done / total, 1.0) if total else 1.0
        amounts = f"{done / 1e6:.1f} MB of {total / 1e6:.1f} MB"
        if reused:
            amounts += f", {reused / 1e6:.1f} MB reused, {(done - reused) / 1e6:.1f} MB fetched"
        if self.tty:
            filled = int(self.width * fraction)
            bar = "█" * filled + "·" * (self.width - filled)
            self.stream.write(f"\r{name:<12} [{bar}] {fraction:4.0%} {amounts}")
            self.stream.flush()
            return
        decile = int(fraction * 10)
        if decile != self._decile:
            self._decile = decile
            self.stream.write(f"{name}: {fraction:.0%} ({amounts})\n")
            self.stream.flush()

    def close(self) -> None:
        """End the current bar's line (a terminal only)."""
        if self.tty and self._name is not None:
            self.stream.write("\n")
            self.stream.flush()
        self._name = None
