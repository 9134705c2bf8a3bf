"""`berth-update daemon`: the long-running agent behind berth-update.service (Type=notify).

Each iteration reloads the configuration, judges the boot while it is still undecided, looks
for an update, installs it, and reboots per the strategy; then it sleeps for the interval with
±10% jitter (so a fleet does not hit the repository in step), or after an error for a backoff
that starts at one minute and doubles up to the interval.

Decisions that matter:

- after-boot is folded in here rather than a separate oneshot unit: the boot is judged at
  start, and again on every iteration while the booted version is still on trial (systemd-bless-
  boot renames its entry only after boot-complete.target, which may come after the daemon
  starts). While on trial nothing is installed: the inactive slot holds the fallback, and
  overwriting it before the running version is blessed would leave nothing to fall back to.
- A version already installed and pending is not downloaded again on every check; the daemon
  only re-announces it (/run/reboot-required, and a reboot again with `immediate`).
- The work (judging the boot, checking, downloading, installing) runs in a forked child
  (worker.py): requests, python-tuf and cryptography are imported there and never in the
  resident process, which stays small while it idles between checks.
- UpdateError (network, refusals, verification, storage), OSError and requests' errors (raised
  in the child, reported back as UpdateError) are logged and retried later; anything else is a
  bug and ends the process (systemd restarts it).
- A malformed /etc/berth/update.toml keeps the last good configuration (config.reload_config);
  at start, when there is none yet, the image's defaults alone are used.
- Reboots go through the strategy's gate (updater.reboot.gate): a window or a lock slot may say "not
  yet", and the daemon looks again when the gate says it is worth it (the window opens, the lock
  retry delay) or at the interval, whichever is first. Once the boot is judged the gate is
  released (FleetLock steady-state): at start, since this machine may hold a slot from before
  its reboot, and after every blessing. Nothing is checked or installed until that release
  succeeds, as with Zincati: a slot that is never given back blocks the fleet.
- Before rebooting, logged-in users are warned (wall) and get `reboot_delay` (service.notice).

One log line per event on stderr; journald stores it with the unit's name.
"""

from __future__ import annotations

import logging
import random
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from updater.config import (
    DEFAULT_PATH,
    MIN_INTERVAL,
    OVERRIDE_PATH,
    ConfigError,
    UpdateConfig,
    load_config,
    reload_config,
)
from updater.errors import UpdateError
from updater.reboot.gate import RebootGate
from updater.service.gates import gate_for
from updater.service.notice import WALL, count_sessions, reboot_message, warn_users
from updater.service.notify import Notifier, NotifyError
from updater.service.worker import run_in_child
from updater.update.machine import FetchOptions, Machine, write_reboot_required
from updater.update.state import load_state, state_path

if TYPE_CHECKING:  # imported at run time only in the worker child
    from updater.agent import Agent

log = logging.getLogger(__name__)

REBOOT_COMMAND = ("systemctl", "reboot")
BACKOFF_START = 60.0
JITTER = 0.1
# Errors the daemon survives: the next iteration (after a backoff) tries again. The worker
# reports the child's network errors as UpdateError.
RECOVERABLE: tuple[type[BaseException], ...] = (UpdateError, OSError)
# Runs a function in a worker and returns its result (run_in_child; tests may run it inline).
Worker = Callable[[Callable[[], Any]], Any]


def run_command(command: Sequence[str]) -> Callable[[], None]:
    """A reboot function that runs `command` and raises UpdateError when it fails."""

    def reboot() -> None:
        try:
            subprocess.run(list(command), check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", None) or e
            raise UpdateError(f"cannot reboot with {' '.join(command)}: {detail}") from e

    return reboot


@dataclass(frozen=True)
class Judgement:
    """agent.AfterBoot as plain data: the worker sends it back, and unpickling an agent class
    would import the agent (and requests, python-tuf) into the resident daemon."""

    booted: str
    reasons: tuple[str, ...]
    blessed: str | None
    pruned: tuple[str, ...]
    waiting: bool


@dataclass(frozen=True)
class ConfigPaths:
    default: Path = DEFAULT_PATH
    override: Path = OVERRIDE_PATH
    min_interval: float = MIN_INTERVAL  # tests poll faster than the device's 60 s


def initial_config(paths: ConfigPaths) -> UpdateConfig:
    """The configuration at start; a malformed override falls back to the image's defaults."""
    try:
        return load_config(paths.default, paths.override, min_interval=paths.min_interval)
    except ConfigError as e:
        log.error("%s; using the image's defaults until it is fixed", e)
        # The defaults file as its own override: the image's values and nothing else.
        return load_config(paths.default, paths.default, min_interval=paths.min_interval)


class Daemon:
    def __init__(
        self,
        machine: Machine,
        config: UpdateConfig,
        *,
        paths: ConfigPaths | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
        reboot: Callable[[], None] | None = None,
        notifier: Notifier | None = None,
        fetch_options: FetchOptions | None = None,
        backoff_start: float = BACKOFF_START,
        worker: Worker = run_in_child,
        gate_factory: Callable[[UpdateConfig], RebootGate] | None = None,
        sessions: Callable[[], int | None] = count_sessions,
        wall: Sequence[str] = WALL,
    ) -> None:
        self.machine = machine
        self.config = config
        self.paths = paths or ConfigPaths()
        self._sleep = sleep
        self._clock = clock
        self._jitter = jitter
        self._reboot = reboot or run_command(REBOOT_COMMAND)
        self._notifier = notifier or Notifier()
        self._fetch_options = fetch_options
        self.backoff_start = backoff_start
        self._work = worker
        self.failures = 0  # consecutive failed iterations
        self.judged = False  # the boot is judged and not on trial: updates may be installed
        self.delays: list[float] = []  # every sleep, for the tests and the curious
        self._gate_factory = gate_factory or (lambda c: gate_for(c, machine.machine_id))
        self._gate: RebootGate | None = None  # built on first use: it may need the network
        self.steady = False  # the gate was released since the boot was judged
        self.retry_after: float | None = None  # the gate asked to be asked again sooner
        self._sessions = sessions
        self._wall = wall

    # -- helpers -------------------------------------------------------------------------------

    def _agent(self) -> Agent:
        from updater.agent import Agent  # in the worker child only: see worker.py

        return Agent(
            self.machine,
            self.config,
            now=lambda: datetime.fromtimestamp(self._clock(), UTC),
            fetch_options=self._fetch_options,
        )

    def _notify(self, **fields: str) -> None:
        try:
            self._notifier.send({k.upper(): v for k, v in fields.items()})
        except NotifyError as e:
            log.warning("%s", e)

    def _status(self, text: str) -> None:
        self._notify(status=text)

    @property
    def gate(self) -> RebootGate:
        if self._gate is None:
            self._gate = self._gate_factory(self.config)
        return self._gate

    def _retire_gate(self) -> None:
        """The strategy's settings changed: give back what the old gate holds, best effort."""
        if self._gate is not None:
            try:
                self._gate.release()
            except RECOVERABLE as e:
                log.warning("cannot release the reboot slot of the previous strategy: %s", e)
        self._gate = None
        self.steady = False

    def _reload(self) -> None:
        config, error = reload_config(
            self.config,
            self.paths.default,
            self.paths.override,
            min_interval=self.paths.min_interval,
        )
        if error is not None:
            log.error("%s; keeping the last good configuration", error)
        elif config != self.config:
            log.info(
                "configuration changed: channel %s from %s, strategy %s, every %.0f s",
                config.channel,
                config.url or "(no repository)",
                config.strategy,
                config.interval,
            )
            self._retire_gate()
        self.config = config

    def _judge(self) -> Judgement:
        result = self._agent().after_boot()
        return Judgement(
            booted=str(result.booted),
            reasons=tuple(result.reasons),
            blessed=None if result.blessed is None else str(result.blessed),
            pruned=tuple(result.pruned),
            waiting=result.waiting,
        )

    def _after_boot(self) -> None:
        result: Judgement = self._work(self._judge)
        for reason in result.reasons:
            log.warning("%s", reason)
        if result.blessed is not None:
            log.info("%s booted fine and is now the current version", result.blessed)
        for name in result.pruned:
            log.info("pruned the old boot entry %s", name)
        if result.waiting:
            log.info("%s is on trial: waiting for boot-complete before any update", result.booted)
        self.judged = not result.waiting

    def _verify_pending(self) -> str:
        return str(self._agent().verify_pending())

    def _reboot_for(self, version: str, *, verify: bool = False) -> None:
        decision = self.gate.acquire(datetime.fromtimestamp(self._clock(), UTC))
        if not decision.allowed:
            self.retry_after = decision.retry_after
            self._status(f"installed {version}, waiting for a reboot: {decision.reason}")
            log.info(
                "installed %s; not rebooting now (%s); %s tells kured or an operator",
                version,
                decision.reason,
                self.machine.reboot_required,
            )
            return
        self.steady = False  # from here on this machine may hold a slot until it is blessed
        if verify:
            # Installed in an earlier iteration (or boot): check the slot again right before
            # the reboot that would start it. A refusal gives the slot back.
            self._status(f"verifying {version} before the reboot")
            try:
                self._work(self._verify_pending)
            except BaseException:
                self.gate.release()
                self.steady = True
                raise
        self._status(f"installed {version}, rebooting")
        log.info(
            "installed %s; rebooting (strategy %s: %s)",
            version,
            self.config.strategy,
            decision.reason,
        )
        self._warn_and_wait(version)
        self._reboot()

    def _warn_and_wait(self, version: str) -> None:
        delay = self.config.reboot_delay
        if delay <= 0:
            return
        users = self._sessions()
        if users == 0:
            return
        warn_users(reboot_message(version, delay), self._wall)
        log.info(
            "warned %s logged-in session(s); rebooting in %.0f s",
            "unknown" if users is None else users,
            delay,
        )
        self._sleep(delay)

    def _progress(self, version: str) -> Callable[[str, int, int], None]:
        last = [-1]

        def report(name: str, done: int, total: int) -> None:
            percent = done * 100 // total if total else 100
            if percent // 10 != last[0]:  # STATUS at most every 10%: it is a datagram each
                last[0] = percent // 10
                self._status(f"downloading {version}: {name} {percent}%")

        return report

    # -- one iteration -------------------------------------------------------------------------

    def _update(self) -> tuple[str, bool] | None:
        """In the worker: check, and install a newer release. The version to reboot into, and
        whether it was installed earlier (and must be verified again before that reboot)."""
        agent = self._agent()
        self._status("checking for updates")
        selection = agent.check()
        for reason in selection.reasons:
            log.info("skipped %s", reason)
        release = selection.release
        if release is None:
            log.info("up to date")
            return None
        pending = load_state(state_path(self.machine.var)).pending
        if pending is not None and pending.version >= release.version:
            log.info("%s is installed and waiting for a reboot", pending.version)
            return str(pending.version), True
        log.info("installing %s", release.version)
        self._status(f"downloading {release.version}")
        applied = agent.apply(progress=self._progress(str(release.version)))
        return str(applied.version), False  # verified by apply moments ago

    def step(self) -> None:
        """Judge the boot if undecided, then check, apply and reboot. Raises on errors."""
        if not self.judged:
            self._after_boot()
            if not self.judged:
                return
        if not self.steady:
            # Give back a reboot slot held from before this boot (FleetLock steady-state).
            self.gate.release()
            self.steady = True
        if not self.config.url:
            log.info("no update repository configured; set url in /etc/berth/update.toml")
            return
        update: tuple[str, bool] | None = self._work(self._update)
        if update is None:
            return
        version, earlier = update
        write_reboot_required(self.machine)
        self._reboot_for(version, verify=earlier)

    def _next_delay(self) -> float:
        if self.failures:
            return min(self.backoff_start * 2.0 ** (self.failures - 1), self.config.interval)
        if not self.judged:
            # On trial: the blessing comes minutes after boot; look again soon.
            return min(self.backoff_start, self.config.interval)
        delay = self.config.interval * (1 + JITTER * (2 * self._jitter() - 1))
        if self.retry_after is not None:
            delay = min(delay, self.retry_after)
        return delay

    def run(self, iterations: int | None = None) -> None:
        """The service's main loop; `iterations` bounds it for tests (None: forever)."""
        log.info(
            "starting: channel %s from %s, strategy %s, every %.0f s",
            self.config.channel,
            self.config.url or "(no repository)",
            self.config.strategy,
            self.config.interval,
        )
        try:
            self._after_boot()
        except RECOVERABLE as e:
            log.error("cannot judge this boot: %s", e)
        self._notify(ready="1", status="started")
        done = 0
        while iterations is None or done < iterations:
            done += 1
            self._reload()
            self.retry_after = None
            try:
                self.step()
            except RECOVERABLE as e:
                self.failures += 1
                log.error("update failed (%d in a row): %s", self.failures, e)
            else:
                self.failures = 0
            delay = self._next_delay()
            when = datetime.fromtimestamp(self._clock() + delay).strftime("%H:%M:%S")
            if self.failures:
                self._status(f"retrying at {when} after {self.failures} failure(s)")
            elif not self.judged:
                self._status(f"on trial, judging the boot again at {when}")
            elif self.retry_after is not None:
                self._status(f"update installed, asking for a reboot again at {when}")
            else:
                self._status(f"idle, next check at {when}")
            self.delays.append(delay)
            self._sleep(delay)
