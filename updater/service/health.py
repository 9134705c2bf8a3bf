"""`berth-update health`: is this boot good enough to keep? Run by berth-health.service.

The unit is ordered before boot-complete.target and required by it. On a boot on trial (the
entry still has a boot counter, `berth_1.3.0+2-1.efi`), systemd-bless-boot.service runs after
boot-complete.target and marks the entry good; if this check fails, boot-complete.target is never
reached, the entry is not blessed, and after its tries run out systemd-boot falls back to the
previous version. On a blessed entry (no counter) systemd-bless-boot does nothing, so a failure
here is logged and changes nothing.

Three checks, all run even when one fails so that the journal has the whole picture:

1. No failed units. The check first waits (bounded) until no job but our own is running: this
   unit is part of the boot transaction, so `systemctl is-system-running --wait` would wait for
   this very unit. Units that are still starting when the time runs out are not counted.
2. The agent's own view: the state file parses, a slot holds the root hash on the kernel's
   command line and carries the booted version, the ESP is readable and has that version's entry.
3. Operator hooks: every executable file in /etc/berth/health.d/, in sorted order, each with a
   timeout; a non-zero exit (or a timeout) fails the check with the hook's name and the tail of
   its output.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from updater import run
from updater.agent import Agent, SlotRole
from updater.disk import bootentries, slots
from updater.errors import CommandError, UpdateError
from updater.service.daemon import REBOOT_COMMAND, run_command
from updater.service.hooks import Result as Result  # each check's result, as the hooks'
from updater.service.hooks import run_hooks, tail
from updater.update.state import State, state_path

log = logging.getLogger(__name__)

HOOKS_DIR = Path("/etc/berth/health.d")
OWN_UNIT = "berth-health.service"
SETTLE_TIMEOUT = 120.0
HOOK_TIMEOUT = 60.0

# Runs a systemctl command line (without "systemctl") and returns its standard output.
Systemctl = Callable[[Sequence[str]], str]


class HealthError(UpdateError):
    """A check could not be carried out (systemctl missing or failing)."""


def systemctl(args: Sequence[str]) -> str:
    try:
        done = run.run(["systemctl", *args], timeout=60)
    except CommandError as e:
        raise HealthError(str(e)) from e
    return done.stdout.decode(errors="replace")


def _unit_names(output: str) -> list[str]:
    names = []
    for line in output.splitlines():
        words = line.replace("●", " ").split()
        if words:
            names.append(words[0])
    return names


class HealthCheck:
    def __init__(
        self,
        agent: Agent,
        *,
        hooks_dir: Path = HOOKS_DIR,
        systemctl: Systemctl = systemctl,
        own_unit: str = OWN_UNIT,
        settle_timeout: float = SETTLE_TIMEOUT,
        hook_timeout: float = HOOK_TIMEOUT,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        reboot: Callable[[], None] | None = None,
    ) -> None:
        self.agent = agent
        self.hooks_dir = hooks_dir
        self._systemctl = systemctl
        self.own_unit = own_unit
        self.settle_timeout = settle_timeout
        self.hook_timeout = hook_timeout
        self._sleep = sleep
        self._clock = clock
        self._reboot = reboot or run_command(REBOOT_COMMAND)

    # -- (1) failed units ----------------------------------------------------------------------

    def _running_jobs(self) -> list[str]:
        out = self._systemctl(["list-jobs", "--no-legend", "--plain", "--full"])
        running = []
        for line in out.splitlines():
            words = line.split()  # JOB UNIT TYPE STATE
            if len(words) >= 4 and words[3] == "running" and words[1] != self.own_unit:
                running.append(words[1])
        return running

    def settle(self) -> list[str]:
        """Wait until no other job runs; the units still running when time is up."""
        deadline = self._clock() + self.settle_timeout
        while running := self._running_jobs():
            if self._clock() >= deadline:
                return running
            self._sleep(1.0)
        return []

    def failed_units(self) -> Result:
        try:
            still = self.settle()
            out = self._systemctl(
                ["list-units", "--failed", "--no-legend", "--plain", "--full", "--all"]
            )
        except HealthError as e:
            return Result("failed units", False, str(e))
        failed = [u for u in _unit_names(out) if u != self.own_unit]
        if still:
            log.warning("still starting after %.0f s: %s", self.settle_timeout, ", ".join(still))
        if failed:
            return Result("failed units", False, "failed: " + ", ".join(failed))
        return Result("failed units", True, "none")

    # -- (2) the agent's own check -------------------------------------------------------------

    def agent_check(self) -> Result:
        name = "update agent"
        path = state_path(self.agent.machine.var)
        try:
            if path.exists():
                State.from_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return Result(name, False, f"the state file {path} is unusable: {e}")
        try:
            status = self.agent.status()
            roothash = slots.booted_roothash(self.agent.machine.cmdline)
            entries = bootentries.list_entries(self.agent.machine.esp)
        except (UpdateError, OSError) as e:
            return Result(name, False, str(e))
        booted = [s for s in status.slots if s.state is SlotRole.BOOTED]
        if not booted:
            return Result(name, False, f"no slot holds the booted root hash {roothash}")
        if booted[0].version != status.booted_version:
            return Result(
                name,
                False,
                f"slot {booted[0].name} holds {booted[0].version}, but /etc/os-release says "
                f"{status.booted_version}",
            )
        if not any(str(e.version) == status.booted_version for e in entries):
            return Result(
                name, False, f"the ESP has no boot entry for the booted {status.booted_version}"
            )
        return Result(name, True, f"{status.booted_version} from slot {booted[0].name}")

    # -- (3) operator hooks --------------------------------------------------------------------

    def hooks(self) -> list[Result]:
        return run_hooks(self.hooks_dir, timeout=self.hook_timeout)

    def run(self) -> list[Result]:
        results = [self.failed_units(), self.agent_check(), *self.hooks()]
        for r in results:
            if r.ok:
                log.info("health: %s: ok (%s)", r.name, r.detail)
            else:
                log.error("health: %s: FAILED: %s", r.name, r.detail)
        return results

    def judge(self) -> list[Result]:
        """run(); on a boot on trial that failed, mark the version bad and reboot at once.

        Waiting for the boot counter to run out would boot the failing version twice more; the
        check has already decided, so the previous version boots next, and the reason is kept
        for `berth-update status`.
        """
        results = self.run()
        failed = [r for r in results if not r.ok]
        if failed:
            reason = "health check failed: " + "; ".join(f"{r.name}: {r.detail}" for r in failed)
            rejected = self.agent.reject_trial(tail(reason))
            if rejected is not None:
                log.error("%s is marked bad; rebooting into the previous version", rejected)
                self._reboot()
        return results
