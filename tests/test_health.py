"""The boot health check: operator hooks, failed units through an injected systemctl, and the
agent's own view of the fake machine."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.support.machine import (
    FakeMachine,
    Site,
    make_agent,
    make_verity_release,
    release_manifest,
)
from updater.agent import Agent
from updater.cli import main
from updater.config import UpdateConfig
from updater.release.version import Version
from updater.service.health import HealthCheck, Result
from updater.update.machine import Machine
from updater.update.state import state_path


@pytest.fixture
def fake(tmp_path: Path) -> FakeMachine:
    return FakeMachine(tmp_path / "machine", make_verity_release(tmp_path / "out", "1.0.0"))


class Systemctl:
    """Answers list-jobs from a script of job lists, list-units --failed from `failed`."""

    def __init__(self, jobs: list[list[str]], failed: list[str]) -> None:
        self.jobs = jobs
        self.failed = failed
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, args: Sequence[str]) -> str:
        self.calls.append(tuple(args))
        if args[0] == "list-jobs":
            running = self.jobs.pop(0) if len(self.jobs) > 1 else self.jobs[0]
            return "".join(f"{n} {u} start running\n" for n, u in enumerate(running, 1))
        assert args[:2] == ["list-units", "--failed"]
        return "".join(f"● {u} loaded failed failed Something\n" for u in self.failed)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def check(
    fake: FakeMachine,
    tmp_path: Path,
    systemctl: Systemctl | None = None,
    hook_timeout: float = 5.0,
) -> HealthCheck:
    clock = Clock()
    machine: Machine = fake.machine(tmp_path / "root.json")
    return HealthCheck(
        Agent(machine, UpdateConfig(url="", channel="stable")),
        hooks_dir=tmp_path / "health.d",
        systemctl=systemctl or Systemctl([[]], []),
        settle_timeout=10.0,
        hook_timeout=hook_timeout,
        sleep=clock.sleep,
        clock=clock,
    )


def hook(tmp_path: Path, name: str, body: str, mode: int = 0o755) -> None:
    path = tmp_path / "health.d" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(mode)


def test_hooks_run_in_order_and_report_failures(fake: FakeMachine, tmp_path: Path) -> None:
    log = tmp_path / "order"
    hook(tmp_path, "20-fails", f"echo 20 >> {log}; echo line1; echo 'disk is sad' >&2; exit 3")
    hook(tmp_path, "10-passes", f"echo 10 >> {log}; echo fine")
    hook(tmp_path, "30-not-executable", "exit 1", mode=0o644)
    results = check(fake, tmp_path).hooks()
    assert log.read_text() == "10\n20\n"
    assert results == [
        Result("hook 10-passes", True, "fine"),
        Result("hook 20-fails", False, "exit status 3: line1\ndisk is sad"),
    ]


def test_a_hook_that_hangs_is_killed(fake: FakeMachine, tmp_path: Path) -> None:
    hook(tmp_path, "50-hangs", "echo starting; sleep 300 & sleep 300")
    [result] = check(fake, tmp_path, hook_timeout=0.5).hooks()
    assert not result.ok
    assert result.detail.startswith("timed out after") and result.detail.endswith(": starting")


def test_no_hooks_directory_is_fine(fake: FakeMachine, tmp_path: Path) -> None:
    assert check(fake, tmp_path).hooks() == []


def test_failed_units_excluding_our_own(fake: FakeMachine, tmp_path: Path) -> None:
    systemctl = Systemctl([[]], ["berth-health.service", "containerd.service"])
    result = check(fake, tmp_path, systemctl).failed_units()
    assert result == Result("failed units", False, "failed: containerd.service")
    assert check(fake, tmp_path, Systemctl([[]], ["berth-health.service"])).failed_units().ok


def test_waits_for_other_jobs_to_settle_but_not_forever(fake: FakeMachine, tmp_path: Path) -> None:
    # Two polls with a unit still starting, then only our own job runs.
    systemctl = Systemctl([["a.service"], ["a.service"], ["berth-health.service"]], [])
    health = check(fake, tmp_path, systemctl)
    assert health.settle() == []
    assert [c[0] for c in systemctl.calls] == ["list-jobs"] * 3
    # A unit that never finishes starting: given up after the settle timeout.
    stuck = check(fake, tmp_path, Systemctl([["slow.service"]], []))
    assert stuck.settle() == ["slow.service"]


def test_agent_check(fake: FakeMachine, tmp_path: Path) -> None:
    health = check(fake, tmp_path)
    assert health.agent_check() == Result("update agent", True, "1.0.0 from slot A")
    path = state_path(fake.var)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    assert not health.agent_check().ok
    path.unlink()
    fake.cmdline.write_text("roothash=" + "0" * 64 + "\n")  # a root no slot holds
    result = health.agent_check()
    assert not result.ok and "0" * 64 in result.detail
    fake.cmdline.write_text(f"roothash={fake.roothash}\n")
    for entry in fake.entry_dir.iterdir():
        entry.unlink()
    assert health.agent_check() == Result(
        "update agent", False, "the ESP has no boot entry for the booted 1.0.0"
    )


def test_cli_exit_status(
    fake: FakeMachine,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert main(["health"], health_factory=lambda: check(fake, tmp_path)) == 0
    hook(tmp_path, "10-fails", "echo broken; exit 1")
    assert main(["health"], health_factory=lambda: check(fake, tmp_path)) == 1
    assert "health: hook 10-fails: FAILED: exit status 1: broken" in caplog.text
    assert capsys.readouterr().err == "berth-update: health check failed: hook 10-fails\n"


def test_a_failed_trial_boot_is_marked_bad_at_once_and_reported_after_the_fallback(
    tmp_path: Path, site: Site
) -> None:
    machine = FakeMachine(tmp_path / "trial", site.release("1.0.0"))
    new = site.release("1.1.0")
    site.publish(new)
    make_agent(machine, site).apply()
    machine.boot(Version(1, 1, 0), release_manifest(new).roothash)  # on trial: +3 in its name
    hook(tmp_path, "50-app", "echo the app is not answering; exit 1")
    reboots: list[int] = []
    clock = Clock()
    health = HealthCheck(
        Agent(machine.machine(site.keys / "root.json"), site.config()),
        hooks_dir=tmp_path / "health.d",
        systemctl=Systemctl([[]], ["berth-app.service"]),
        sleep=clock.sleep,
        clock=clock,
        reboot=lambda: reboots.append(1),
    )
    failed = [r.name for r in health.judge() if not r.ok]
    assert failed == ["failed units", "hook 50-app"]
    # Zero tries left: the boot loader starts 1.0.0 next, not 1.1.0 twice more.
    assert machine.boot_order() == ("berth_1.0.0.efi", "berth_1.1.0+0.efi")
    assert reboots == [1]
    # After the fallback, status names the reason and the agent never installs 1.1.0 again.
    machine.boot(Version(1, 0, 0), release_manifest(site.release("1.0.0")).roothash)
    agent = make_agent(machine, site)
    agent.after_boot()
    status = agent.status()
    assert status.pending is None
    assert len(status.bad) == 1 and status.bad[0].startswith("1.1.0: rolled back from 1.1.0")
    assert "berth-app.service" in status.bad[0] and "the app is not answering" in status.bad[0]
    assert agent.check().release is None


def test_a_failure_on_a_blessed_boot_only_reports(fake: FakeMachine, tmp_path: Path) -> None:
    hook(tmp_path, "50-app", "exit 1")
    health = check(fake, tmp_path)
    reboots: list[int] = []
    health._reboot = lambda: reboots.append(1)
    assert [r.name for r in health.judge() if not r.ok] == ["hook 50-app"]
    assert reboots == [] and fake.boot_order() == ("berth_1.0.0.efi",)
