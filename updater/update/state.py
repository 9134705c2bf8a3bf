"""The agent's memory between runs: `<var>/lib/berth/state.json`, replaced atomically.

What the disk and the ESP cannot say by themselves lives here: when the last check ran and what
it found, which installed version waits for a reboot (and why the daemon's reboot into it
waits, when a pre-reboot hook failed), which versions failed on this machine and why (never
installed again automatically), and the last version seen booted.

The file is a convenience, never a source of truth for what boots: a corrupt or unreadable
state file is moved aside with a warning and the agent starts afresh (it rediscovers a failed
version the next time the boot loader falls back). Standard library only.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from updater.errors import StorageError
from updater.files import write_file_atomic
from updater.release.document import json_object
from updater.release.version import Version

log = logging.getLogger(__name__)

_FORMAT = 1


@dataclass(frozen=True)
class LastCheck:
    time: datetime
    result: str  # "1.3.0 available", "up to date", "failed: <why>"
    ok: bool


@dataclass(frozen=True)
class Pending:
    """A version written into the inactive slot and on the ESP, waiting for a reboot."""

    version: Version
    slot: str
    roothash: str
    installed: datetime
    boot_id: str  # the boot that installed it: a fallback can only be judged after a reboot
    # What it changes in the packages, as `PackageChanges.lines()` with the summary first;
    # empty when the channel did not say.
    changes: tuple[str, ...] = ()


@dataclass(frozen=True)
class TransferRecord:
    """What installing `version` took from the network and from this machine's own disk."""

    version: Version
    fetched: int  # bytes received (payload, manifest, block index)
    reused: int  # bytes of the payload copied from the booted slot and UKI
    requests: int  # HTTP requests for the payload
    when: datetime

    def describe(self) -> str:
        total = self.fetched + self.reused
        share = f" ({self.reused / total:.0%} reused)" if total else ""
        return (
            f"{self.version}: fetched {_mb(self.fetched)}, reused {_mb(self.reused)}{share} "
            f"in {self.requests} requests"
        )


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


TRANSFERS_KEPT = 5


@dataclass(frozen=True)
class BadVersion:
    version: Version
    reason: str  # "rolled back from 1.3.0: boot did not complete"
    since: datetime


@dataclass(frozen=True)
class RebootHeld:
    """Why the daemon did not reboot into `version` although the gate allowed it: a pre-reboot
    hook failed (service/hooks.py), and when it tries again."""

    version: Version
    reason: str  # "hook 50-drain: exit status 1: error: cannot evict pod ..."
    since: datetime
    retry: datetime


@dataclass(frozen=True)
class State:
    last_check: LastCheck | None = None
    pending: Pending | None = None
    bad: tuple[BadVersion, ...] = field(default=())
    last_booted: Version | None = None
    # This machine's rollout seed as last derived from /etc/machine-id; kept so that status can
    # show it and so that a machine whose machine-id went missing keeps its place in the waves.
    seed: int | None = None
    reboot_held: RebootHeld | None = None
    # The newest installs' transfers, oldest first (at most TRANSFERS_KEPT).
    transfers: tuple[TransferRecord, ...] = ()

    def with_transfer(self, record: TransferRecord) -> State:
        return replace(self, transfers=(*self.transfers, record)[-TRANSFERS_KEPT:])

    @property
    def bad_versions(self) -> frozenset[Version]:
        return frozenset(b.version for b in self.bad)

    def with_bad(self, version: Version, reason: str, when: datetime) -> State:
        """Mark `version` bad, replacing an earlier reason for it."""
        others = tuple(b for b in self.bad if b.version != version)
        return replace(self, bad=(*others, BadVersion(version, reason, when)))

    def without_bad(self, version: Version) -> State:
        return replace(self, bad=tuple(b for b in self.bad if b.version != version))

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "format": _FORMAT,
            "last_check": None
            if self.last_check is None
            else {
                "time": _time(self.last_check.time),
                "result": self.last_check.result,
                "ok": self.last_check.ok,
            },
            "pending": None
            if self.pending is None
            else {
                "version": str(self.pending.version),
                "slot": self.pending.slot,
                "roothash": self.pending.roothash,
                "installed": _time(self.pending.installed),
                "boot_id": self.pending.boot_id,
                "changes": list(self.pending.changes),
            },
            "bad": [
                {"version": str(b.version), "reason": b.reason, "since": _time(b.since)}
                for b in self.bad
            ],
            "last_booted": None if self.last_booted is None else str(self.last_booted),
            "seed": self.seed,
            "reboot_held": None
            if self.reboot_held is None
            else {
                "version": str(self.reboot_held.version),
                "reason": self.reboot_held.reason,
                "since": _time(self.reboot_held.since),
                "retry": _time(self.reboot_held.retry),
            },
            "transfers": [
                {
                    "version": str(t.version),
                    "fetched": t.fetched,
                    "reused": t.reused,
                    "requests": t.requests,
                    "when": _time(t.when),
                }
                for t in self.transfers
            ],
        }
        return json.dumps(doc, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> State:
        """Parse; any deviation raises ValueError (load_state turns that into a fresh start)."""
        doc = json_object(text, "the agent's state", ValueError)
        if doc.get("format") != _FORMAT:
            raise ValueError(f"expected an object with format {_FORMAT}")
        check = doc.get("last_check")
        pending = doc.get("pending")
        booted = doc.get("last_booted")
        seed = doc.get("seed")
        held = doc.get("reboot_held")  # absent in files written before pre-reboot hooks
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed: expected an integer, got {seed!r}")
        return cls(
            last_check=None
            if check is None
            else LastCheck(_parse_time(check["time"]), str(check["result"]), bool(check["ok"])),
            pending=None
            if pending is None
            else Pending(
                Version.parse(pending["version"]),
                str(pending["slot"]),
                str(pending["roothash"]),
                _parse_time(pending["installed"]),
                str(pending["boot_id"]),
                _lines(pending.get("changes", []), "pending.changes"),
            ),
            bad=tuple(
                BadVersion(Version.parse(b["version"]), str(b["reason"]), _parse_time(b["since"]))
                for b in doc.get("bad", [])
            ),
            last_booted=None if booted is None else Version.parse(booted),
            seed=seed,
            reboot_held=None
            if held is None
            else RebootHeld(
                Version.parse(held["version"]),
                str(held["reason"]),
                _parse_time(held["since"]),
                _parse_time(held["retry"]),
            ),
            transfers=tuple(
                TransferRecord(
                    Version.parse(t["version"]),
                    _count(t["fetched"]),
                    _count(t["reused"]),
                    _count(t["requests"]),
                    _parse_time(t["when"]),
                )
                for t in doc.get("transfers", [])  # absent in files from before seeded updates
            ),
        )


def _time(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds")


def _parse_time(text: object) -> datetime:
    if not isinstance(text, str):
        raise ValueError(f"expected a time, got {text!r}")
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        raise ValueError(f"time {text!r} has no time zone")
    return when


def state_path(var: Path) -> Path:
    return var / "lib/berth/state.json"


def load_state(path: Path, now: datetime | None = None, *, set_aside: bool = True) -> State:
    """The saved state, or a fresh one when there is none or it is unusable: moved aside, so that
    the next save does not bury it, unless `set_aside` is false (a reader that must not write)."""
    try:
        # Bytes: a state file that is not UTF-8 is corrupt like any other (below), not a crash.
        text = path.read_bytes()
    except FileNotFoundError:
        return State()
    except OSError as e:
        log.warning("cannot read %s (%s); starting with an empty state", path, e)
        return State()
    try:
        return State.from_json(text)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        if not set_aside:
            log.warning("%s is corrupt (%s); reading it as an empty state", path, e)
            return State()
        stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
        aside = path.with_name(f"{path.name}.corrupt-{stamp}")
        try:
            os.replace(path, aside)
        except OSError as move_error:
            log.warning("cannot move the corrupt %s aside: %s", path, move_error)
        else:
            log.warning(
                "%s is corrupt (%s); moved it to %s and started with an empty state",
                path,
                e,
                aside.name,
            )
        return State()


def save_state(path: Path, state: State) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(path, state.to_json().encode())
    except OSError as e:
        raise StorageError(f"cannot save the agent's state to {path}: {e}") from e


def _count(raw: object) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 0:
        raise ValueError(f"expected a byte or request count, got {raw!r}")
    return raw


def _lines(raw: object, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise ValueError(f"{where}: expected a list of strings")
    return tuple(raw)
