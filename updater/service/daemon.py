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
- The work (judging the boot, checking, installing, verifying) runs in forked children
  (worker.py): requests, python-tuf and cryptography are imported there and never in the
  resident process, which stays small while it idles between checks. The daemon learns what the
  state file says (the pending update) from the agent in the child, never by reading it itself.
- UpdateError (network, refusals, verification, storage), OSError and requests' errors (raised
  in the child, reported back as UpdateError) are logged and retried later; anything else is a
  bug and ends the process (systemd restarts it).
- A malformed /etc/berth/update.toml keeps the last good configuration (config.reload_config);
  at start, when there is none yet, the image's defaults alone are used, and when those are
  malformed too, no repository (FALLBACK_CONFIG): the boot is still judged. Every refusal is
  logged with the file and key; none ends the process.
- Reboots go through the strategy's gate (updater.reboot.gate): a window or a lock slot may say "not
  yet", and the daemon looks again when the gate says it is worth it (the window opens, the lock
  retry delay) or at the interval, whichever is first. Once the boot is judged the gate is
  released (FleetLock steady-state): at start, since this machine may hold a slot from before
  its reboot, and after every blessing. Nothing is checked or installed until that release
  succeeds, as with Zincati: a slot that is never given back blocks the fleet.
- Before rebooting, the pre-reboot hooks run (every executable file in /etc/berth/pre-reboot.d/,
  in name order, each for at most HOOK_TIMEOUT; service/hooks.py): a drain, say. They run once
  the gate allowed the reboot and the slot is verified, and before users are warned: the warning
  promises a reboot, so it comes once nothing can postpone it. The first hook that fails (or
  times out) postpones the reboot: the reason goes into the agent's state (`berth-update
  status`), the strategy's slot goes back (as kured does after a failed drain: one node whose
  drain cannot finish must not hold the fleet's lock), and the daemon asks the gate again after
  HOOK_RETRY or the interval, whichever is shorter; the hooks run again then.
- Then logged-in users are warned (wall) and get `reboot_delay` (service.notice).

The loop is a state machine (Zincati's update agent is the model): one `Phase` says what the
daemon does, `DaemonState` carries what goes with it (the failures in a row, where a retry
starts, the update and the gate's answer), and every change goes through `Daemon._transition`,
which refuses one that `TRANSITIONS` does not list: that would be a bug, and the process ends.
An iteration starts from a resting phase and ends in one:

    STARTING   -> JUDGING                        run() judges the boot before the first iteration
    JUDGING    -> ON_TRIAL | JUDGED | RELEASING  on trial; judged at start; judged in an iteration
               |  STARTING | BACKOFF             that failed at start (judged again at once); later
    ON_TRIAL   -> JUDGING                        judged again every iteration, a minute apart
    JUDGED     -> RELEASING                      a slot held from before goes back first
    RELEASING  -> CHECKING | IDLE | BACKOFF      IDLE: no repository configured; WAITING: a
               |  WAITING                        pre-reboot hook failed, and its slot went back
    CHECKING   -> IDLE | INSTALLING | BACKOFF    up to date; a newer release; the check failed
               |  WAITING | VERIFYING            installed earlier: the gate says not yet, or yes
    INSTALLING -> WAITING | PRE_REBOOT | BACKOFF the gate says not yet, or yes
    VERIFYING  -> PRE_REBOOT | RELEASING         the slot changed: its reboot slot goes back, and
                                                 the iteration ends in BACKOFF
    PRE_REBOOT -> REBOOTING | RELEASING          the hooks passed; one failed: the slot goes back
    REBOOTING  -> JUDGED | BACKOFF               the reboot is queued: systemd stops the service
    WAITING    -> CHECKING | JUDGED              the next check; JUDGED: the configuration
    IDLE       -> CHECKING | JUDGED | IDLE       changed, so the new gate's slot goes back first;
                                                 IDLE: still no repository
    BACKOFF    -> JUDGING | RELEASING | CHECKING the retry starts where the failure stopped
               |  BACKOFF                        the configuration changed: RELEASING first

Each phase's STATUS= line (`systemctl status berth-update`) comes from the state.

One log line per event on stderr; journald stores it with the unit's name.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from updater import run
from updater.config import (
    DEFAULT_PATH,
    MIN_INTERVAL,
    OVERRIDE_PATH,
    ConfigError,
    UpdateConfig,
    load_config,
    reload_config,
)
from updater.errors import CommandError, UpdateError
from updater.reboot.gate import RebootGate
from updater.release.version import Version
from updater.service.gates import gate_for
from updater.service.hooks import Result, run_hooks
from updater.service.notice import WALL, count_sessions, reboot_message, warn_users
from updater.service.notify import Notifier, NotifyError
from updater.service.worker import run_in_child
from updater.update.context import read_os_release
from updater.update.machine import FetchOptions, Machine, write_reboot_required
from updater.update.state import RebootHeld

if TYPE_CHECKING:  # imported at run time only in the worker child
    from updater.agent import Agent
    from updater.update.install import ProgressCallback

log = logging.getLogger(__name__)

REBOOT_COMMAND = ("systemctl", "reboot")
PRE_REBOOT_HOOKS = Path("/etc/berth/pre-reboot.d")
# A drain waits for pods to stop (their terminationGracePeriodSeconds, a PodDisruptionBudget):
# minutes, not seconds. A hook that takes longer is killed, and the reboot waits.
HOOK_TIMEOUT = 600.0
# After a failed pre-reboot hook, the gate is asked again (and the hooks run again) after this
# long, or the interval when that is shorter.
HOOK_RETRY = 300.0
BACKOFF_START = 60.0
# How long the worker waits for the agent's lock held by another actor (an operator's apply)
# before the iteration fails as "busy" and backs off: the loop never blocks for good.
LOCK_WAIT = 60.0
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
            # systemctl reboot returns once the job is queued: a manager silent for a minute is
            # an error to retry, not a reason for the daemon to hang.
            run.run(command, timeout=60.0)
        except CommandError as e:
            said = e.stderr.decode(errors="replace").strip() if e.status is not None else ""
            raise UpdateError(f"cannot reboot with {' '.join(command)}: {said or e}") from e

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
class Checked:
    """What the worker's check found, as plain data (see Judgement): the candidate, the releases
    skipped and why, and the update installed and waiting for a reboot (the state file's, read
    by the agent)."""

    candidate: str | None
    skipped: tuple[str, ...]
    pending: str | None


class Phase(StrEnum):
    """What the daemon does; a resting phase is what it sleeps in until the next iteration."""

    STARTING = "starting"  # the boot is not judged yet (at start, or that judgement failed)
    JUDGING = "judging"  # the worker judges the boot (what after-boot does)
    ON_TRIAL = "on trial"  # resting: the booted version waits for its blessing
    JUDGED = "judged"  # resting: judged, and a reboot slot may still be held: give it back
    RELEASING = "releasing"  # giving the strategy's reboot slot back (FleetLock steady-state)
    CHECKING = "checking"  # the worker refreshes the channel and picks a candidate
    INSTALLING = "installing"  # the worker writes the candidate into the inactive slot
    VERIFYING = "verifying"  # the gate allowed the reboot: the pending slot is checked again
    PRE_REBOOT = "pre-reboot"  # the gate allowed it: the pre-reboot hooks run (a drain)
    REBOOTING = "rebooting"  # the gate allowed it: users are warned, then the reboot command
    WAITING = "waiting"  # resting: an update is installed and the gate said not yet
    IDLE = "idle"  # resting: up to date, or no repository configured
    BACKOFF = "backoff"  # resting: the iteration failed; the next one starts from `resume`


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.STARTING: frozenset({Phase.JUDGING}),
    Phase.JUDGING: frozenset(
        {Phase.ON_TRIAL, Phase.JUDGED, Phase.RELEASING, Phase.STARTING, Phase.BACKOFF}
    ),
    Phase.ON_TRIAL: frozenset({Phase.JUDGING}),
    Phase.JUDGED: frozenset({Phase.RELEASING}),
    Phase.RELEASING: frozenset({Phase.CHECKING, Phase.IDLE, Phase.WAITING, Phase.BACKOFF}),
    Phase.CHECKING: frozenset(
        {Phase.IDLE, Phase.INSTALLING, Phase.WAITING, Phase.VERIFYING, Phase.BACKOFF}
    ),
    Phase.INSTALLING: frozenset({Phase.WAITING, Phase.PRE_REBOOT, Phase.BACKOFF}),
    Phase.VERIFYING: frozenset({Phase.PRE_REBOOT, Phase.RELEASING}),
    Phase.PRE_REBOOT: frozenset({Phase.REBOOTING, Phase.RELEASING}),
    Phase.REBOOTING: frozenset({Phase.JUDGED, Phase.BACKOFF}),
    Phase.WAITING: frozenset({Phase.CHECKING, Phase.JUDGED}),
    Phase.IDLE: frozenset({Phase.CHECKING, Phase.JUDGED, Phase.IDLE}),
    Phase.BACKOFF: frozenset({Phase.JUDGING, Phase.RELEASING, Phase.CHECKING, Phase.BACKOFF}),
}
RESTING = frozenset({Phase.ON_TRIAL, Phase.JUDGED, Phase.WAITING, Phase.IDLE, Phase.BACKOFF})
# The first phase of the iteration after each resting phase (after BACKOFF: its `resume`;
# after STARTING: the judgement at start failed).
_NEXT = {
    Phase.STARTING: Phase.JUDGING,
    Phase.ON_TRIAL: Phase.JUDGING,
    Phase.JUDGED: Phase.RELEASING,
    Phase.WAITING: Phase.CHECKING,
    Phase.IDLE: Phase.CHECKING,
}
# Where the next iteration starts after one that failed in this phase: a reboot slot the
# machine may hold goes back first; an update installed (or a slot refused) before the failure
# is found again by the next check.
_RESUME = {
    Phase.JUDGING: Phase.JUDGING,
    Phase.RELEASING: Phase.RELEASING,
    Phase.CHECKING: Phase.CHECKING,
    Phase.INSTALLING: Phase.CHECKING,
    Phase.REBOOTING: Phase.RELEASING,
}
_WITH_VERSION = frozenset(
    {Phase.INSTALLING, Phase.VERIFYING, Phase.PRE_REBOOT, Phase.REBOOTING, Phase.WAITING}
)


class IllegalTransition(RuntimeError):
    """The daemon tried a change of phase its table does not have: a bug, not an update error."""


@dataclass(frozen=True)
class DaemonState:
    """A phase and the data that goes with it; every change is a new value, through
    Daemon._transition."""

    phase: Phase = Phase.STARTING
    failures: int = 0  # failed iterations in a row: counted into BACKOFF, kept through the retry
    resume: Phase | None = None  # BACKOFF: the phase the next iteration starts from
    version: str | None = None  # INSTALLING, VERIFYING, PRE_REBOOT, REBOOTING, WAITING: the update
    reason: str = ""  # WAITING: why the gate said not yet
    retry_after: float | None = None  # WAITING: seconds until asking the gate again is worth it

    def __post_init__(self) -> None:
        if (self.phase is Phase.BACKOFF) != (self.resume is not None):
            raise ValueError(f"{self.phase}: resume is {self.resume} (only BACKOFF has one)")
        if (self.phase in _WITH_VERSION) != (self.version is not None):
            raise ValueError(f"{self.phase}: version is {self.version}")

    def announcement(self) -> str | None:
        """The STATUS= line on entering this phase (None: the one before still says it)."""
        if self.phase is Phase.CHECKING:
            return "checking for updates"
        if self.phase is Phase.INSTALLING:
            return f"downloading {self.version}"
        if self.phase is Phase.WAITING:
            return f"installed {self.version}, waiting for a reboot: {self.reason}"
        if self.phase is Phase.VERIFYING:
            return f"verifying {self.version} before the reboot"
        if self.phase is Phase.PRE_REBOOT:
            return f"running the pre-reboot hooks before rebooting into {self.version}"
        if self.phase is Phase.REBOOTING:
            return f"installed {self.version}, rebooting"
        return None

    def resting(self, when: str) -> str:
        """The STATUS= line while the daemon sleeps in this phase until `when` (HH:MM:SS)."""
        if self.phase is Phase.BACKOFF:
            return f"retrying at {when} after {self.failures} failure(s)"
        if self.phase is Phase.ON_TRIAL:
            return f"on trial, judging the boot again at {when}"
        if self.phase is Phase.WAITING and self.retry_after is not None:
            return f"update installed, asking for a reboot again at {when}"
        # IDLE, JUDGED (a reboot queued, or a new gate), and WAITING on a gate that has no
        # better time than the next check (strategy off): the next thing is the check.
        return f"idle, next check at {when}"


@dataclass(frozen=True)
class ConfigPaths:
    default: Path = DEFAULT_PATH
    override: Path = OVERRIDE_PATH
    min_interval: float = MIN_INTERVAL  # tests poll faster than the device's 60 s
    pre_reboot: Path = PRE_REBOOT_HOOKS


# What the daemon runs on when not even the image's update.toml can be read: no repository
# (nothing is checked or installed), but the boot is still judged, so that a machine whose
# files went bad keeps blessing a good boot and falling back from a bad one.
FALLBACK_CONFIG = UpdateConfig(url="", channel="stable")


def initial_config(paths: ConfigPaths) -> UpdateConfig:
    """The configuration at start; a malformed override falls back to the image's defaults, and
    malformed defaults to FALLBACK_CONFIG. Never raises: a daemon that exits on a bad file would
    stop judging boots, and systemd would restart it into the same file."""
    try:
        return load_config(paths.default, paths.override, min_interval=paths.min_interval)
    except ConfigError as e:
        log.error("%s; using the image's defaults until it is fixed", e)
    try:
        # The defaults file as its own override: the image's values and nothing else.
        return load_config(paths.default, paths.default, min_interval=paths.min_interval)
    except ConfigError as e:
        log.error("%s; running without an update repository until it is fixed", e)
        return FALLBACK_CONFIG


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
        lock_wait: float = LOCK_WAIT,
        hook_timeout: float = HOOK_TIMEOUT,
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
        self.state = DaemonState()
        self.delays: list[float] = []  # every sleep, for the tests and the curious
        self._gate_factory = gate_factory or (lambda c: gate_for(c, machine.machine_id))
        self._gate: RebootGate | None = None  # built on first use: it may need the network
        self._sessions = sessions
        self._wall = wall
        self.lock_wait = lock_wait
        self.hook_timeout = hook_timeout

    # -- the state machine ---------------------------------------------------------------------

    def _transition(self, new: DaemonState) -> None:
        """The one place the state changes; a change TRANSITIONS does not list is a bug."""
        old = self.state.phase
        if new.phase not in TRANSITIONS[old]:
            raise IllegalTransition(f"the daemon cannot go from {old} to {new.phase}")
        self.state = new
        log.debug("%s -> %s", old, new.phase)
        text = new.announcement()
        if text is not None:
            self._status(text)

    def _enter(
        self,
        phase: Phase,
        *,
        version: str | None = None,
        reason: str = "",
        retry_after: float | None = None,
    ) -> None:
        # A resting phase other than BACKOFF ends an iteration that went well: the count of
        # failures in a row starts again.
        failures = 0 if phase in RESTING else self.state.failures
        self._transition(
            DaemonState(
                phase, failures=failures, version=version, reason=reason, retry_after=retry_after
            )
        )

    def _back_off(self, error: BaseException, resume: Phase | None = None) -> None:
        """The iteration failed: log it and rest in BACKOFF, to start again from `resume` (by
        default where the failure leaves things, see _RESUME)."""
        phase = self.state.phase
        where = resume or _RESUME.get(phase)
        if where is None:
            raise IllegalTransition(f"the daemon failed in {phase}, which no retry starts from")
        failures = self.state.failures + 1
        log.error("update failed (%d in a row): %s", failures, error)
        self._transition(DaemonState(Phase.BACKOFF, failures=failures, resume=where))

    # -- helpers -------------------------------------------------------------------------------

    def _agent(self) -> Agent:
        from updater.agent import Actor, Agent  # in the worker child only: see worker.py

        return Agent(
            self.machine,
            self.config,
            now=lambda: datetime.fromtimestamp(self._clock(), UTC),
            fetch_options=self._fetch_options,
            actor=Actor("berth-update daemon", self.lock_wait),
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
        """The strategy's settings changed: give back what the old gate holds, best effort, and
        have the new one give back what it may hold (another strategy's slot) before a check."""
        if self._gate is not None:
            try:
                self._gate.release()
            except RECOVERABLE as e:
                log.warning("cannot release the reboot slot of the previous strategy: %s", e)
        self._gate = None
        state = self.state
        if state.phase in (Phase.IDLE, Phase.WAITING):
            self._enter(Phase.JUDGED)
        elif state.phase is Phase.BACKOFF and state.resume is Phase.CHECKING:
            self._transition(replace(state, resume=Phase.RELEASING))

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

    def _progress(self, version: str) -> ProgressCallback:
        last = [-1]

        def report(name: str, done: int, total: int, reused: int = 0) -> None:
            percent = done * 100 // total if total else 100
            if percent // 10 != last[0]:  # STATUS at most every 10%: it is a datagram each
                last[0] = percent // 10
                note = f" ({reused / 1e6:.0f} MB reused)" if reused else ""
                self._status(f"downloading {version}: {name} {percent}%{note}")

        return report

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

    # -- work in the worker child --------------------------------------------------------------

    def _judgement(self) -> Judgement:
        result = self._agent().after_boot()
        return Judgement(
            booted=str(result.booted),
            reasons=tuple(result.reasons),
            blessed=None if result.blessed is None else str(result.blessed),
            pruned=tuple(result.pruned),
            waiting=result.waiting,
        )

    def _check(self) -> Checked:
        agent = self._agent()
        selection = agent.check()
        pending = agent.pending()
        return Checked(
            candidate=None if selection.release is None else str(selection.release.version),
            skipped=tuple(selection.reasons),
            pending=None if pending is None else str(pending),
        )

    def _install(self, version: str) -> str:
        return str(self._agent().apply(progress=self._progress(version)).version)

    def _verify_pending(self) -> str:
        return str(self._agent().verify_pending())

    def _hold_reboot(self, held: RebootHeld | None) -> None:
        self._agent().hold_reboot(held)

    # -- the phases of an iteration ------------------------------------------------------------

    def _judge(self) -> bool:
        """JUDGING: judge the boot in the worker; False while the booted version is on trial."""
        self._enter(Phase.JUDGING)
        result: Judgement = self._work(self._judgement)
        for reason in result.reasons:
            log.warning("%s", reason)
        if result.blessed is not None:
            log.info("%s booted fine and is now the current version", result.blessed)
        for name in result.pruned:
            log.info("pruned the old boot entry %s", name)
        if result.waiting:
            log.info("%s is on trial: waiting for boot-complete before any update", result.booted)
            self._enter(Phase.ON_TRIAL)
            return False
        return True

    def _release(self) -> None:
        """RELEASING: give back a reboot slot held from before this boot (FleetLock
        steady-state). Nothing is checked or installed until that succeeds."""
        self._enter(Phase.RELEASING)
        self.gate.release()

    def _update(self) -> None:
        """CHECKING, then INSTALLING a newer release, then the reboot per the strategy."""
        if not self.config.url:
            log.info("no update repository configured; set url in /etc/berth/update.toml")
            self._enter(Phase.IDLE)
            return
        self._enter(Phase.CHECKING)
        checked: Checked = self._work(self._check)
        for reason in checked.skipped:
            log.info("skipped %s", reason)
        if checked.candidate is None:
            log.info("up to date")
            self._enter(Phase.IDLE)
            return
        candidate = Version.parse(checked.candidate)
        pending = None if checked.pending is None else Version.parse(checked.pending)
        if pending is not None and pending >= candidate:
            # Installed in an earlier iteration (or boot): announced again, not downloaded.
            log.info("%s is installed and waiting for a reboot", pending)
            version, earlier = str(pending), True
        else:
            log.info("installing %s", candidate)
            self._enter(Phase.INSTALLING, version=str(candidate))
            version = self._work(lambda: self._install(str(candidate)))
            earlier = False  # verified by apply moments ago
        write_reboot_required(self.machine)
        self._reboot_for(version, verify=earlier)

    def _reboot_for(self, version: str, *, verify: bool) -> None:
        """WAITING when the gate says not yet; else VERIFYING (an update installed earlier),
        then REBOOTING."""
        decision = self.gate.acquire(datetime.fromtimestamp(self._clock(), UTC))
        if not decision.allowed:
            self._enter(
                Phase.WAITING,
                version=version,
                reason=decision.reason,
                retry_after=decision.retry_after,
            )
            log.info(
                "installed %s; not rebooting now (%s); %s tells kured or an operator",
                version,
                decision.reason,
                self.machine.reboot_required,
            )
            return
        # From here on this machine may hold a reboot slot until the new version is blessed.
        if verify:
            # Check the slot again right before the reboot that would start it. A refusal
            # gives the slot back.
            self._enter(Phase.VERIFYING, version=version)
            try:
                self._work(self._verify_pending)
            except BaseException as e:
                self._release()  # if this fails, the next iteration gives it back
                if not isinstance(e, RECOVERABLE):
                    raise
                self._back_off(e, resume=Phase.CHECKING)
                return
        if not self._pre_reboot(version):
            return
        self._enter(Phase.REBOOTING, version=version)
        log.info(
            "installed %s; rebooting (strategy %s: %s)",
            version,
            self.config.strategy,
            decision.reason,
        )
        self._warn_and_wait(version)
        self._reboot()
        # systemctl reboot returns once the reboot is queued; systemd then stops this service.
        # Until it does, the slot taken for the reboot counts as held.
        self._enter(Phase.JUDGED)

    def _pre_reboot(self, version: str) -> bool:
        """PRE_REBOOT: run the pre-reboot hooks; False when one failed and the reboot waits
        (the slot given back, resting in WAITING)."""
        self._enter(Phase.PRE_REBOOT, version=version)
        try:
            current = read_os_release(self.machine.os_release).get("IMAGE_VERSION", "")
        except UpdateError as e:
            log.warning("%s; the hooks get no BERTH_CURRENT_VERSION", e)
            current = ""
        env = {
            "BERTH_CURRENT_VERSION": current,
            "BERTH_NEXT_VERSION": version,
            "BERTH_STRATEGY": str(self.config.strategy),
        }
        results = run_hooks(
            self.paths.pre_reboot, timeout=self.hook_timeout, env=env, stop_at_failure=True
        )
        failed: Result | None = None
        for r in results:
            if r.ok:
                log.info("pre-reboot %s: ok (%s)", r.name, r.detail)
            else:
                log.error("pre-reboot %s: FAILED: %s; the reboot waits", r.name, r.detail)
                failed = r
        if failed is None:
            self._record_hold(None)  # a failure recorded earlier is over
            return True
        retry = min(HOOK_RETRY, self.config.interval)
        now = datetime.fromtimestamp(self._clock(), UTC)
        detail = f"{failed.name}: {failed.detail}"
        held = RebootHeld(Version.parse(version), detail, now, now + timedelta(seconds=retry))
        self._record_hold(held)
        self._release()  # if this fails, the next iteration gives it back
        # One line for STATUS= ("exit status 3", "timed out after 600 s"); the output is above.
        reason = f"pre-reboot {failed.name} failed ({failed.detail.split(':', 1)[0]})"
        self._enter(Phase.WAITING, version=version, reason=reason, retry_after=retry)
        return False

    def _record_hold(self, held: RebootHeld | None) -> None:
        """Best effort: the journal and STATUS= say it too, and a busy agent (an operator's
        apply) must neither keep a drained machine from its reboot nor hold the slot."""
        try:
            self._work(lambda: self._hold_reboot(held))
        except RECOVERABLE as e:
            log.warning("cannot record in the agent's state why the reboot waits: %s", e)

    # -- one iteration -------------------------------------------------------------------------

    def step(self) -> None:
        """One iteration, from a resting phase to the next: judge the boot while it is on trial,
        give back the reboot slot once it is judged, check, install and reboot. Raises on errors
        (run backs off)."""
        state = self.state
        start = state.resume if state.phase is Phase.BACKOFF else _NEXT[state.phase]
        if start is Phase.JUDGING:
            if not self._judge():
                return
            start = Phase.RELEASING
        if start is Phase.RELEASING:
            self._release()
        self._update()

    def _next_delay(self) -> float:
        state = self.state
        if state.phase is Phase.BACKOFF:
            return min(self.backoff_start * 2.0 ** (state.failures - 1), self.config.interval)
        if state.phase is Phase.ON_TRIAL:
            # On trial: the blessing comes minutes after boot; look again soon.
            return min(self.backoff_start, self.config.interval)
        delay = self.config.interval * (1 + JITTER * (2 * self._jitter() - 1))
        if state.phase is Phase.WAITING and state.retry_after is not None:
            delay = min(delay, state.retry_after)
        return delay

    def run(self, iterations: int | None = None) -> None:
        """The service's main loop; `iterations` bounds it for tests (None: forever). A second
        call goes on from where the first stopped."""
        if self.state.phase is Phase.STARTING:
            log.info(
                "starting: channel %s from %s, strategy %s, every %.0f s",
                self.config.channel,
                self.config.url or "(no repository)",
                self.config.strategy,
                self.config.interval,
            )
            try:
                if self._judge():
                    self._enter(Phase.JUDGED)
            except RECOVERABLE as e:
                log.error("cannot judge this boot: %s", e)
                self._enter(Phase.STARTING)  # the first iteration judges again
            self._notify(ready="1", status="started")
        done = 0
        while iterations is None or done < iterations:
            done += 1
            self._reload()
            try:
                self.step()
            except RECOVERABLE as e:
                self._back_off(e)
            if self.state.phase not in RESTING:
                raise IllegalTransition(f"an iteration ended in {self.state.phase}")
            delay = self._next_delay()
            when = datetime.fromtimestamp(self._clock() + delay).strftime("%H:%M:%S")
            self._status(self.state.resting(when))
            self.delays.append(delay)
            self._sleep(delay)
