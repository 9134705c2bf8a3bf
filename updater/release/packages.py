"""What changed in the packages between two releases: the publisher computes it, the channel
manifest carries it, and the agent shows it for the update this machine would install.

`packages.txt` (name, version, architecture per line, tab-separated) is written by every build.
`PackageChanges.between` compares two of them; `compose` chains the changes of the releases
between the booted version and a newer one, so a machine several releases behind sees what
the whole step changes on it. Standard library only: the agent runs on the image's own Python.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from updater.release.version import Version

# A release changes a few hundred packages at most; a list far beyond is not a change list.
MAX_CHANGES = 20000


class PackagesError(ValueError):
    """A package list or a change list is malformed; the message names where and what."""


def parse_package_list(text: str, source: str) -> dict[str, str]:
    """`packages.txt` as name -> version."""
    packages: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3 or not all(fields):
            raise PackagesError(
                f"{source}: line {number}: expected 'name<TAB>version<TAB>architecture', "
                f"got {line[:80]!r}"
            )
        packages[fields[0]] = fields[1]
    return packages


@dataclass(frozen=True)
class PackageChanges:
    """The package changes from release `since` to the one that carries them."""

    since: Version
    added: tuple[tuple[str, str], ...] = ()  # (name, version)
    removed: tuple[tuple[str, str], ...] = ()  # (name, version it had)
    changed: tuple[tuple[str, str, str], ...] = ()  # (name, old version, new version)

    @classmethod
    def between(
        cls, since: Version, before: Mapping[str, str], after: Mapping[str, str]
    ) -> PackageChanges:
        return cls(since, *_diff(before, after))

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def lines(self) -> list[str]:
        """`name old → new`, `+name version`, `-name version`: changed, added, removed."""
        return _lines(self.added, self.removed, self.changed)

    def summary(self) -> str:
        return (
            f"since {self.since}: {len(self.changed)} changed, {len(self.added)} added, "
            f"{len(self.removed)} removed"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "since": str(self.since),
            "added": [list(a) for a in self.added],
            "removed": [list(r) for r in self.removed],
            "changed": [list(c) for c in self.changed],
        }

    @classmethod
    def from_dict(cls, raw: object, where: str) -> PackageChanges:
        if not isinstance(raw, dict):
            raise PackagesError(f"{where}: expected an object with since, added, removed, changed")
        unknown = set(raw) - {"since", "added", "removed", "changed"}
        if unknown:
            raise PackagesError(f"{where}: unknown field(s): {', '.join(sorted(unknown))}")
        since = raw.get("since")
        try:
            version = Version.parse(since) if isinstance(since, str) else None
        except ValueError:
            version = None
        if version is None:
            raise PackagesError(f"{where}.since: expected a version string, got {since!r}")
        return cls(
            version,
            _rows(raw.get("added", []), 2, f"{where}.added"),
            _rows(raw.get("removed", []), 2, f"{where}.removed"),
            _rows(raw.get("changed", []), 3, f"{where}.changed"),
        )


_Added = tuple[tuple[str, str], ...]
_Changed = tuple[tuple[str, str, str], ...]


def _diff(before: Mapping[str, str], after: Mapping[str, str]) -> tuple[_Added, _Added, _Changed]:
    return (
        tuple((n, after[n]) for n in sorted(after.keys() - before.keys())),
        tuple((n, before[n]) for n in sorted(before.keys() - after.keys())),
        tuple(
            (n, before[n], after[n])
            for n in sorted(before.keys() & after.keys())
            if before[n] != after[n]
        ),
    )


def _lines(added: _Added, removed: _Added, changed: _Changed) -> list[str]:
    return (
        [f"{n} {old} → {new}" for n, old, new in changed]
        + [f"+{n} {v}" for n, v in added]
        + [f"-{n} {v}" for n, v in removed]
    )


def diff_lines(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """The lines of `PackageChanges.lines` for two name -> version mappings."""
    return _lines(*_diff(before, after))


def _rows(raw: object, width: int, where: str) -> tuple[Any, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_CHANGES:
        raise PackagesError(f"{where}: expected a list of at most {MAX_CHANGES} entries")
    rows = []
    for i, row in enumerate(raw):
        if (
            not isinstance(row, list)
            or len(row) != width
            or not all(isinstance(x, str) and x and len(x) <= 256 for x in row)
        ):
            raise PackagesError(
                f"{where}[{i}]: expected a list of {width} non-empty strings, got {row!r:.80}"
            )
        rows.append(tuple(row))
    return tuple(rows)


def compose(
    booted: Version, steps: Mapping[Version, PackageChanges], target: Version
) -> PackageChanges | None:
    """What going from `booted` straight to `target` changes, from `steps` (a release's version
    -> its change list): followed back from `target`, each list's `since` names the release
    before. None when the chain does not reach `booted`."""
    chain: list[PackageChanges] = []
    at = target
    while at != booted:
        step = steps.get(at)
        if step is None or len(chain) > len(steps) or not step.since < at:
            return None
        chain.append(step)
        at = step.since
    net: dict[str, tuple[str | None, str | None]] = {}
    for step in reversed(chain):
        for name, version in step.added:
            net[name] = (net[name][0] if name in net else None, version)
        for name, version in step.removed:
            net[name] = (net[name][0] if name in net else version, None)
        for name, old, new in step.changed:
            net[name] = (net[name][0] if name in net else old, new)
    items = sorted(net.items())
    return PackageChanges(
        booted,
        tuple((n, new) for n, (old, new) in items if old is None and new is not None),
        tuple((n, old) for n, (old, new) in items if new is None and old is not None),
        tuple(
            (n, old, new)
            for n, (old, new) in items
            if old is not None and new is not None and old != new
        ),
    )


def change_lines(changes: PackageChanges | None) -> tuple[str, ...]:
    """A summary line, then one line per package; nothing when the changes are not known."""
    if changes is None:
        return ()
    return (f"package changes {changes.summary()}", *changes.lines())
