"""The reboot gate: may this machine reboot into its installed update now?

The daemon asks `acquire` before every reboot and calls `release` once the machine is in its
steady state (the booted version is blessed, or the daemon starts on a judged boot, when it may
still hold a slot taken before its last reboot). One gate per strategy:

| strategy   | acquire                                    | release                  |
|------------|--------------------------------------------|--------------------------|
| immediate  | yes                                        | nothing                  |
| off        | no: kured or an operator reboots           | nothing                  |
| window     | yes inside a [[window]], else "not before" | nothing                  |
| fleet-lock | FleetLock pre-reboot granted               | FleetLock steady-state   |
| etcd-lock  | a slot of airlock's semaphore in etcd      | the slot is given back   |

A refusal carries `retry_after`: the window's next opening, or for a lock a delay that starts at
30 s and doubles up to 5 minutes, so a waiting fleet does not hammer the lock service. A lock
service that cannot be reached raises LockError, which the daemon treats like any other update
error (logged, backoff).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from updater.errors import UpdateError
from updater.reboot.windows import Schedule
from updater.release.identity import lock_id

if TYPE_CHECKING:  # they import requests: only a lock strategy loads them (see service/worker.py)
    from updater.reboot.fleetlock import FleetLockClient
    from updater.reboot.semaphore import SemaphoreClient

LOCK_RETRY_START = 30.0
LOCK_RETRY_MAX = 300.0


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    retry_after: float | None = None  # seconds until asking again is worth it; None: interval


class RebootGate(ABC):
    @abstractmethod
    def acquire(self, now: datetime) -> Decision: ...

    def release(self) -> None:  # noqa: B027 (a no-op unless the gate takes something)
        """Give back whatever a previous `acquire` took; a no-op for gates that take nothing."""


class Immediate(RebootGate):
    def acquire(self, now: datetime) -> Decision:
        return Decision(True, "strategy immediate")


class Off(RebootGate):
    def acquire(self, now: datetime) -> Decision:
        return Decision(False, "strategy off: kured or an operator reboots")


class WindowGate(RebootGate):
    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def acquire(self, now: datetime) -> Decision:
        if self.schedule.contains(now):
            return Decision(True, "inside a maintenance window")
        opens = self.schedule.next_open(now)
        # One second past the opening, so the next look is inside, not at its edge.
        return Decision(
            False,
            f"next maintenance window opens at {opens.isoformat(timespec='minutes')}",
            (opens - now).total_seconds() + 1,
        )


class LockGate(RebootGate):
    """A slot from a counting semaphore, directly in etcd or through a FleetLock server."""

    def __init__(
        self,
        *,
        fleetlock: FleetLockClient | None = None,
        semaphore: SemaphoreClient | None = None,
        holder: str,
    ) -> None:
        if (fleetlock is None) == (semaphore is None):
            raise ValueError("give either a FleetLock client or a semaphore")
        self.fleetlock = fleetlock
        self.semaphore = semaphore
        self.holder = holder
        self.refusals = 0  # in a row, for the retry delay

    def _retry(self) -> float:
        self.refusals += 1
        return min(LOCK_RETRY_START * 2.0 ** (self.refusals - 1), LOCK_RETRY_MAX)

    def acquire(self, now: datetime) -> Decision:
        if self.fleetlock is not None:
            answer = self.fleetlock.pre_reboot()
            where = self.fleetlock.base_url
            ok, why = answer.ok, f"HTTP {answer.status}: {answer.message}"
        else:
            assert self.semaphore is not None
            outcome = self.semaphore.acquire(self.holder)
            s, where = outcome.semaphore, self.semaphore.key
            ok, why = outcome.ok, f"all {s.total_slots} slots held by {', '.join(s.holders)}"
        if ok:
            self.refusals = 0
            return Decision(True, f"holding a reboot slot from {where}")
        return Decision(False, f"no reboot slot from {where}: {why}", self._retry())

    def release(self) -> None:
        if self.fleetlock is not None:
            self.fleetlock.steady_state()
        else:
            assert self.semaphore is not None
            self.semaphore.release(self.holder)


def holder_id(machine_id: Path) -> str:
    """This machine's lock holder id, derived from /etc/machine-id (updater.release.identity)."""
    try:
        return lock_id(machine_id.read_text(encoding="ascii"))
    except (OSError, ValueError) as e:
        raise UpdateError(f"{machine_id}: cannot derive a reboot-lock id: {e}") from None
