"""The update agent: what `berth-update`, the daemon's worker and the health check call.

A small facade over one update's life (updater/update): `check` chooses a release (choose.py),
`apply` installs it and `verify_pending` checks it again before its reboot (install.py, whose
docstring is the safety argument), `after_boot`, `reject_trial` and `rollback` judge a boot
(judge.py), and `status` and `pending` read what all of them left behind without writing
(status.py).

Importing this module loads requests and python-tuf: the resident daemon uses it only in its
worker child (see service/worker.py).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from updater.config import UpdateConfig
from updater.release.channel import Selection
from updater.release.version import Version
from updater.update import choose, install, judge, status
from updater.update.context import Context
from updater.update.install import Applied, ProgressCallback
from updater.update.judge import AfterBoot, RolledBack
from updater.update.machine import FetchOptions, Machine
from updater.update.status import SlotRole, SlotStatus, Status
from updater.update.trust import TrustedRepository

__all__ = [
    "AfterBoot",
    "Agent",
    "Applied",
    "ProgressCallback",
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
    ) -> None:
        self.machine = machine
        self.config = config
        self.fetch_options = fetch_options or FetchOptions()
        self._context = Context(
            machine, config, now or (lambda: datetime.now(UTC)), self.fetch_options
        )

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
        return choose.check(self._context, ignore_waves=ignore_waves)

    def apply(
        self,
        version: Version | None = None,
        *,
        allow_downgrade: bool = False,
        ignore_waves: bool = False,
        progress: ProgressCallback | None = None,
    ) -> Applied:
        """Install the selected (or the given) release into the inactive slot (install.py)."""
        return install.apply(
            self._context,
            version,
            allow_downgrade=allow_downgrade,
            ignore_waves=ignore_waves,
            progress=progress,
        )

    def verify_pending(self) -> Version:
        """Verify the pending slot again right before rebooting into it."""
        return install.verify_pending(self._context)

    def after_boot(self) -> AfterBoot:
        """Judge the boot that just happened: a fallback, or a good boot to bless."""
        return judge.after_boot(self._context)

    def reject_trial(self, reason: str) -> Version | None:
        """The booted version, on trial, failed its health check: mark it bad now."""
        return judge.reject_trial(self._context, reason)

    def rollback(self) -> RolledBack:
        """Boot the previous version (the other slot) next, by the operator's choice."""
        return judge.rollback(self._context)
