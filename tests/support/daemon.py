"""The update daemon on a fake machine, with the world around it faked: its sleeps (the loop
never waits, the clock moves ahead instead), its reboot (counted), its configuration files and
its pre-reboot hooks (`pre-reboot.d` in the test's directory).

    harness = Harness(tmp_path, fake, site, notify=None)
    harness.defaults(site.url)
    harness.daemon().run(iterations=1)
    assert harness.reboots == 1
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.support.machine import FakeMachine, Site
from updater.service.daemon import ConfigPaths, Daemon, DaemonState, Phase, initial_config
from updater.service.notify import Notifier
from updater.update.machine import FetchOptions

INTERVAL = 600.0


class Recorded(Daemon):
    """A daemon that keeps the phases it went through (`path`), to hold each scenario to its
    path through the state machine and the table to what the scenarios take."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.path = [self.state.phase]

    def _transition(self, new: DaemonState) -> None:
        super()._transition(new)
        self.path.append(new.phase)


def path(*parts: str) -> list[Phase]:
    """A path through the state machine from phase names: the start, then each iteration."""
    return [Phase[name] for part in parts for name in part.split()]


START = "STARTING JUDGING JUDGED"
INSTALL_AND_REBOOT = "RELEASING CHECKING INSTALLING PRE_REBOOT REBOOTING JUDGED"
# Every scenario's path; together they take every transition the table allows.
PATHS = {
    "immediate": path(START, INSTALL_AND_REBOOT),
    "off": path(START, "RELEASING CHECKING INSTALLING WAITING", *["CHECKING WAITING"] * 2),
    "up to date": path(START, "RELEASING CHECKING IDLE"),
    "repository down": path(
        START,
        "RELEASING CHECKING BACKOFF",
        *["CHECKING BACKOFF"] * 4,
        "BACKOFF " + INSTALL_AND_REBOOT,  # the new url: a new gate, whose slot goes back first
    ),
    "last good config": path(START, "RELEASING CHECKING BACKOFF", "CHECKING INSTALLING WAITING"),
    "on trial": path(
        "STARTING JUDGING ON_TRIAL",
        *["JUDGING ON_TRIAL"] * 2,
        "JUDGING " + INSTALL_AND_REBOOT,
    ),
    "slot changed": path(
        START,
        "RELEASING CHECKING INSTALLING WAITING",
        "JUDGED RELEASING CHECKING VERIFYING RELEASING BACKOFF",
        "CHECKING IDLE",
    ),
    "no repository": path(START, "RELEASING IDLE", "IDLE", "JUDGED " + INSTALL_AND_REBOOT),
    "judging fails": path(
        "STARTING JUDGING STARTING",
        "JUDGING BACKOFF",
        "JUDGING RELEASING CHECKING IDLE",
        "CHECKING IDLE",
    ),
    "download fails": path(
        START,
        "RELEASING CHECKING INSTALLING BACKOFF",
        "CHECKING INSTALLING PRE_REBOOT REBOOTING JUDGED",
    ),
    "reboot fails": path(
        START,
        "RELEASING CHECKING INSTALLING PRE_REBOOT REBOOTING BACKOFF",
        "RELEASING CHECKING VERIFYING PRE_REBOOT REBOOTING JUDGED",
    ),
    # tests/test_reboot_gate.py
    "window": path(
        START,
        "RELEASING CHECKING INSTALLING WAITING",
        "CHECKING VERIFYING PRE_REBOOT REBOOTING JUDGED",
    ),
    "fleet-lock": path(
        START,
        "RELEASING CHECKING BACKOFF",  # the repository is still empty
        "CHECKING INSTALLING WAITING",
        "CHECKING WAITING",
        "CHECKING VERIFYING PRE_REBOOT REBOOTING JUDGED",
    ),
    "fleet-lock, after the reboot": path(
        "STARTING JUDGING ON_TRIAL", "JUDGING ON_TRIAL", "JUDGING RELEASING CHECKING IDLE"
    ),
    "etcd-lock without its CA file": path(START, "RELEASING BACKOFF"),
    # tests/test_pre_reboot.py
    "hook fails, then passes": path(
        START,
        "RELEASING CHECKING INSTALLING PRE_REBOOT RELEASING WAITING",
        "CHECKING VERIFYING PRE_REBOOT REBOOTING JUDGED",
    ),
}


class Harness:
    def __init__(self, tmp: Path, fake: FakeMachine, site: Site, notify: str | None) -> None:
        self.fake, self.site = fake, site
        self.paths = ConfigPaths(
            tmp / "usr-update.toml", tmp / "etc-update.toml", pre_reboot=tmp / "pre-reboot.d"
        )
        self.reboots = 0
        self.slept: list[float] = []
        self.offset = 0.0  # the fake sleeps move the daemon's clock ahead of the real one
        self.notify = notify

    def defaults(self, url: str, strategy: str = "immediate", extra: str = "") -> None:
        """The image's update.toml; `extra` is more TOML after its [update] table."""
        self.paths.default.write_text(
            f'[update]\nurl = "{url}"\nchannel = "stable"\nstrategy = "{strategy}"\n'
            f"interval = {INTERVAL:.0f}\n{extra}"
        )

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.offset += seconds

    def clock(self) -> float:
        # Real time plus the slept seconds: a release published after the harness was made
        # (its wave opening at the time of publishing) is open at the daemon's "now".
        return time.time() + self.offset

    def reboot(self) -> None:
        self.reboots += 1

    def daemon(self, jitter: float = 0.5, **overrides: Any) -> Recorded:
        """A daemon living in the harness's world; `overrides` replace its keyword arguments."""
        options: dict[str, Any] = {
            "paths": self.paths,
            "sleep": self.sleep,
            "clock": self.clock,
            "jitter": lambda: jitter,
            "reboot": self.reboot,
            "notifier": Notifier(self.notify or ""),
            "fetch_options": FetchOptions(timeout=(2.0, 2.0), attempts=1, backoff=0.0),
            # Nobody logged in: no warning delay (tests/test_reboot_gate.py warns someone).
            "sessions": lambda: 0,
            **overrides,
        }
        return Recorded(
            self.fake.machine(self.site.keys / "root.json"), initial_config(self.paths), **options
        )
