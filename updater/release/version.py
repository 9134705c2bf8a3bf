"""Release versions, MAJOR.MINOR.PATCH compared numerically; shared by the builder and the agent.

Stdlib only: this module runs on the device with the image's own Python. The builder's build
counter (the default version of a build) lives in builder/counter.py: a device never counts builds.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

from updater.limits import MAX_DIGITS

# [0-9] rather than \d: \d also accepts non-ASCII digits, which int() would happily convert.
# At most MAX_DIGITS digits a part: int() of thousands of them raises.
_PART = rf"(0|[1-9][0-9]{{0,{MAX_DIGITS - 1}}})"
_VERSION_RE = re.compile(rf"{_PART}\.{_PART}\.{_PART}")


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
                f"(three non-negative integers of at most {MAX_DIGITS} digits, without leading "
                "zeros, like 2025.1122.0)"
            )
        major, minor, patch = (int(part) for part in match.groups())
        return cls(major, minor, patch)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


def version_argument(text: str) -> Version:
    """`type=` for a command-line option that takes a version (./build.py and berth-update).

    argparse reports an ArgumentTypeError's own message; a ValueError would become "invalid
    version_argument value", without saying what a version looks like.
    """
    try:
        return Version.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
