"""airlock's reboot semaphore: a counting semaphore in one key, changed only by compare-and-swap.

    key    com.coreos.airlock/groups/<group>/v1/semaphore
    value  {"total_slots": 2, "holders": ["<id>", ...]}     (holders sorted)

The layout and the rules are airlock's (coreos/airlock, internal/lock), so Berth agents,
berth-lockd and airlock-managed Fedora CoreOS machines can share one semaphore:

- a group whose key does not exist yet is created with a default slot count (airlock's
  ensureInit), by a write that succeeds only while the key is still absent;
- locking is recursive: a holder that asks again is granted without a write;
- a new holder is added only while fewer than total_slots hold it;
- every write is a compare-and-swap against the revision the change was computed from; a lost
  race reads again and recomputes. Nothing is ever written blind.

The store is an interface (`Store`): `etcdlock.EtcdStore` is etcd v3, `MemoryStore` is the same
contract in memory (the fleet simulation uses it). The semaphore code is the same for both.

Standard library only: this runs on the device's own Python.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from updater.errors import UpdateError

# The FleetLock protocol's rule for group labels, bounded as a DNS name is: the group is part of
# an etcd key, and berth-lockd takes it from any client.
GROUP_NAME = re.compile(r"[a-zA-Z0-9.-]{1,253}")
# FleetLock leaves holder ids open (Zincati sends a UUID, Berth a hex digest). Every writer of the
# semaphore bounds them like a DNS name and keeps them printable, so that an id can neither bloat
# the key's value nor forge or hide a line in berth-lockd's log.
HOLDER_MAX_BYTES = 253
KEY_TEMPLATE = "com.coreos.airlock/groups/{group}/v1/semaphore"
# A lost compare-and-swap means someone else's write went through: the semaphore made progress.
# Give up only after this many losses in a row, which under any real contention is minutes.
CAS_ATTEMPTS = 200


class LockError(UpdateError):
    """The lock service or store is unreachable, misbehaves, or holds a malformed semaphore."""


@dataclass(frozen=True)
class Versioned:
    """A key's value and the revision it was last changed at; revision 0: the key is absent."""

    value: bytes | None
    revision: int


class Store(Protocol):
    """What the semaphore needs from a key-value store: read, and write-if-unchanged."""

    def get(self, key: str) -> Versioned: ...

    def compare_and_swap(self, key: str, revision: int, value: bytes) -> Versioned | None:
        """Write `value` if the key is still at `revision` (0: still absent).

        Returns None on success, else what the key holds now (so the caller can retry without
        another read).
        """
        ...


def holder_problem(holder: object) -> str | None:
    """What is wrong with a lock holder id, as "expected ..." words; None when nothing is."""
    if not isinstance(holder, str) or not holder:
        return "a non-empty string"
    # isprintable() refuses control characters (C0, DEL, C1), format characters (bidi overrides,
    # zero-width ones), line and paragraph separators and lone surrogates; a space is allowed.
    if not holder.isprintable():
        return "printable characters only (no control, format or line-separator characters)"
    if len(holder.encode()) > HOLDER_MAX_BYTES:
        return f"at most {HOLDER_MAX_BYTES} bytes (UTF-8), not {len(holder.encode())}"
    return None


def check_holder(holder: str, what: str = "holder id") -> None:
    """Raise LockError, showing the id escaped and cut short, unless `holder_problem` is None."""
    problem = holder_problem(holder)
    if problem is not None:
        shown = repr(holder[:64]) + ("..." if len(holder) > 64 else "")
        raise LockError(f"{what} {shown}: expected {problem}")


def semaphore_key(group: str) -> str:
    if not GROUP_NAME.fullmatch(group):
        raise ValueError(f"group {group!r}: expected letters, digits, '.' or '-'")
    # airlock escapes the group with url.QueryEscape; for the allowed characters it is the same.
    return KEY_TEMPLATE.format(group=urllib.parse.quote_plus(group))


@dataclass(frozen=True)
class Semaphore:
    total_slots: int
    holders: tuple[str, ...] = field(default=())

    @property
    def free(self) -> int:
        return max(self.total_slots - len(self.holders), 0)

    def to_json(self) -> bytes:
        # Go's encoding/json field order and compact form, as airlock writes it.
        doc = {"total_slots": self.total_slots, "holders": sorted(self.holders)}
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, data: bytes, where: str) -> Semaphore:
        try:
            doc = json.loads(data)
        except RecursionError:  # a few thousand "[" in the etcd value
            raise LockError(
                f"{where}: the semaphore is not valid JSON: nested too deeply"
            ) from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int() of 5000 digits
            reason = str(e).split(";")[0]
            raise LockError(f"{where}: the semaphore is not valid JSON: {reason}") from None
        slots = doc.get("total_slots") if isinstance(doc, dict) else None
        holders = doc.get("holders") if isinstance(doc, dict) else None
        if holders is None and isinstance(doc, dict):
            holders = []  # Go writes a nil slice as null
        if (
            not isinstance(slots, int)
            or isinstance(slots, bool)
            or slots < 0
            or not isinstance(holders, list)
            or not all(isinstance(h, str) for h in holders)
        ):
            raise LockError(
                f'{where}: expected {{"total_slots": N, "holders": [ids]}}, got {data[:200]!r}'
            )
        return cls(slots, tuple(sorted(holders)))


@dataclass(frozen=True)
class Outcome:
    """What one semaphore operation found and did."""

    semaphore: Semaphore  # as it is after the operation
    changed: bool  # the operation wrote a new value
    ok: bool  # acquire: this id holds a slot; release: it does not any more


class SemaphoreClient:
    """The semaphore of one group in `store`. Thread-safe as far as `store` is."""

    def __init__(
        self,
        store: Store,
        group: str,
        default_slots: int = 1,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store = store
        self.group = group
        self.key = semaphore_key(group)
        self.default_slots = default_slots
        self._sleep = sleep

    def _current(self, found: Versioned) -> Semaphore:
        if found.revision == 0 or found.value is None:
            return Semaphore(self.default_slots)
        return Semaphore.parse(found.value, self.key)

    def update(self, change: Callable[[Semaphore], tuple[Semaphore, bool]]) -> Outcome:
        """Apply `change` (semaphore -> (new semaphore, ok)) by compare-and-swap until it sticks.

        A change that returns the semaphore unchanged writes nothing, except that a group whose
        key does not exist yet is created (so operators see it).
        """
        found = self.store.get(self.key)
        for attempt in range(CAS_ATTEMPTS):
            current = self._current(found)
            new, ok = change(current)
            if new == current and found.revision != 0:
                return Outcome(current, False, ok)
            conflict = self.store.compare_and_swap(self.key, found.revision, new.to_json())
            if conflict is None:
                return Outcome(new, True, ok)
            found = conflict
            if attempt >= 3:
                # Many writers at once: spread the retries so they stop colliding.
                self._sleep(random.uniform(0, 0.002 * min(attempt, 50)))
        raise LockError(f"{self.key}: gave up after {CAS_ATTEMPTS} conflicting writes")

    def acquire(self, holder: str) -> Outcome:
        """Take a slot for `holder`; `ok` is True when it holds one (already held counts)."""

        check_holder(holder)

        def lock(s: Semaphore) -> tuple[Semaphore, bool]:
            if holder in s.holders:
                return s, True
            if len(s.holders) >= s.total_slots:
                return s, False
            return replace(s, holders=tuple(sorted((*s.holders, holder)))), True

        return self.update(lock)

    def release(self, holder: str) -> Outcome:
        """Give back `holder`'s slot if it holds one; `changed` says whether it did."""

        def unlock(s: Semaphore) -> tuple[Semaphore, bool]:
            if holder not in s.holders:
                return s, True
            return replace(s, holders=tuple(h for h in s.holders if h != holder)), True

        return self.update(unlock)

    def set_slots(self, slots: int) -> Outcome:
        """Change the slot count. Current holders keep their slots even above the new count."""
        if slots < 0:
            raise ValueError(f"slots must be 0 or more, got {slots}")
        return self.update(lambda s: (replace(s, total_slots=slots), True))

    def show(self) -> tuple[Semaphore, bool]:
        """The semaphore, and whether it exists in the store (else: what it would be created as)."""
        found = self.store.get(self.key)
        return self._current(found), found.revision != 0


class MemoryStore:
    """`Store` in memory, with etcd's revision semantics: one counter for the whole store."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, Versioned] = {}
        self._revision = 0

    def get(self, key: str) -> Versioned:
        with self._lock:
            return self._data.get(key, Versioned(None, 0))

    def compare_and_swap(self, key: str, revision: int, value: bytes) -> Versioned | None:
        with self._lock:
            current = self._data.get(key, Versioned(None, 0))
            if current.revision != revision:
                return current
            self._revision += 1
            self._data[key] = Versioned(value, self._revision)
            return None
