"""The update agent: what `berth-update`, the daemon's worker and the health check call.

A small facade over one update's life (updater/update): `check` chooses a release (choose.py),
`apply` installs it and `verify_pending` checks it again before its reboot (install.py, whose
docstring is the safety argument), `hold_reboot` records why the daemon's reboot waits,
`after_boot`, `reject_trial` and `rollback` judge a boot (judge.py), and `status` and `pending`
read what all of them left behind without writing (status.py).

Every method that changes the slots, the ESP or the state holds the agent's one lock
(update/lock.py) for its whole run, and reads what it decides on (the state, the slots, the
ESP) only once it holds it: a second actor (the daemon's worker, another `berth-update`) waits,
or ends with BusyError, and never writes beside the first. `status` and `pending` take no lock.

Importing this module loads requests and python-tuf: the resident daemon uses it only in its
worker child (see service/worker.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime

from updater.config import UpdateConfig
from updater.release.channel import Selection
from updater.release.version import Version
from updater.update import bootcheck, choose, install, judge, status
from updater.update.context import Context
from updater.update.install import Applied, ProgressCallback
from updater.update.judge import AfterBoot, RolledBack
from updater.update.lock import Actor, AgentLock, BusyError
from updater.update.machine import FetchOptions, Machine
from updater.update.state import RebootHeld
from updater.update.status import SlotRole, SlotStatus, Status
from updater.update.trust import TrustedRepository

__all__ = [
    "Actor",
    "AfterBoot",
    "Agent",
    "Applied",
    "BusyError",
    "ProgressCallback",
    "RebootHeld",
    "RolledBack",
    "SlotRole",
    "SlotStatus",
    "Status",
]


class Agent:
    def __init__(
        self,
        machine: Machine,
        config: UpdateConfig,
        *,
        now: Callable[[], datetime] | None = None,
        fetch_options: FetchOptions | None = None,
        actor: Actor | None = None,
    ) -> None:
        self.machine = machine
        self.config = config
        self.fetch_options = fetch_options or FetchOptions()
        # Who this agent is to a second actor, and how long it waits for the lock; the CLI sets
        # it per command.
        self.actor = actor or Actor()
        self._context = Context(
            machine, config, now or (lambda: datetime.now(UTC)), self.fetch_options
        )

    @contextlib.contextmanager
    def _locked(self, action: str) -> Iterator[Context]:
        """The context of one changing call, under the lock: everything it decides on is read
        inside the block."""
        lock = AgentLock(self.machine.lock_dir, self.actor)
        with lock.hold(action):
            yield replace(self._context, lock=lock)

    def repository(self) -> TrustedRepository:
        """The configured repository's TUF client (RefusedError when none is configured)."""
        return choose.repository(self._context)

    def status(self) -> Status:
        """What this machine runs, what each slot holds, what the agent last did. No network."""
        return status.read_status(self._context)

    def pending(self) -> Version | None:
        """The installed version waiting for a reboot (the state file; no network)."""
        return status.pending(self._context)

    def check(self, *, ignore_waves: bool = False) -> Selection:
        """Refresh the signed metadata and pick the release this machine should install now."""
        with self._locked("checking for updates") as ctx:  # it saves the state
            return choose.check(ctx, ignore_waves=ignore_waves)

    def apply(
        self,
        version: Version | None = None,
        *,
        allow_downgrade: bool = False,
        ignore_waves: bool = False,
        progress: ProgressCallback | None = None,
    ) -> Applied:
        """Install the selected (or the given) release into the inactive slot (install.py);
        `Applied.already` when that release is installed and pending already (another actor's
        apply, say)."""
        with self._locked("applying") as ctx:
            return install.apply(
                ctx,
                version,
                allow_downgrade=allow_downgrade,
                ignore_waves=ignore_waves,
                progress=progress,
            )

    def verify_pending(self) -> Version:
        """Verify the pending slot again right before rebooting into it."""
        with self._locked("verifying the pending update") as ctx:
            return install.verify_pending(ctx)

    def hold_reboot(self, held: RebootHeld | None) -> None:
        """Record why the daemon's reboot into the pending update waits (a pre-reboot hook
        failed), or with None that it no longer does; `status` shows it. Writes only a change."""
        with self._locked("recording why the reboot waits") as ctx:
            state = ctx.load_state()
            if state.reboot_held != held:
                ctx.save_state(replace(state, reboot_held=held))

    def after_boot(self) -> AfterBoot:
        """Judge the boot that just happened: a fallback, or a good boot to bless."""
        with self._locked("judging the boot") as ctx:
            return judge.after_boot(ctx)

    def check_entries(self) -> list[bootcheck.Refused]:
        """With Secure Boot enforced, set aside the boot entries the firmware would refuse
        (berth-boot-check.service, as the machine stops)."""
        with self._locked("checking the boot entries") as ctx:
            return bootcheck.check_entries(ctx)

    def reject_trial(self, reason: str) -> Version | None:
        """The booted version, on trial, failed its health check: mark it bad now."""
        with self._locked("rejecting the version on trial") as ctx:
            return judge.reject_trial(ctx, reason)

    def rollback(self) -> RolledBack:
        """Boot the previous version (the other slot) next, by the operator's choice."""
        with self._locked("rolling back") as ctx:
            return judge.rollback(ctx)
