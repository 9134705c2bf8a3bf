"""Pre-reboot hooks (/etc/berth/pre-reboot.d/): real shell scripts run by the daemon on a fake
machine with a real signed repository, right before it reboots into an update: in order, with
the versions in their environment, and a failure or a hang that postpones the reboot (and, with
a lock strategy, gives the slot back while it waits)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from tests.support.daemon import PATHS, Harness
from tests.support.etcd import EtcdServer
from tests.support.machine import MACHINE_ID, FakeMachine, Site, make_agent
from tests.test_run import gone
from updater.cli import format_status
from updater.reboot.etcdlock import EtcdStore
from updater.reboot.semaphore import SemaphoreClient
from updater.release.identity import lock_id
from updater.service.daemon import HOOK_RETRY, DaemonState, Phase


@pytest.fixture
def harness(tmp_path: Path, fake: FakeMachine, site: Site) -> Harness:
    h = Harness(tmp_path, fake, site, None)
    h.defaults(site.url)
    return h


def hook(harness: Harness, name: str, body: str, mode: int = 0o755) -> Path:
    harness.paths.pre_reboot.mkdir(exist_ok=True)
    path = harness.paths.pre_reboot / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(mode)
    return path


def test_hooks_run_in_order_with_the_versions_then_the_reboot(
    harness: Harness,
    site: Site,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = tmp_path / "log"
    monkeypatch.setenv("BERTH_TEST_LEAK", "leaked")  # the daemon's environment is not the hook's
    hook(
        harness,
        "20-drain",
        'echo "20 $BERTH_CURRENT_VERSION $BERTH_NEXT_VERSION $BERTH_STRATEGY'
        f' ${{BERTH_TEST_LEAK:-clean}}" >> {log}; echo drained',
    )
    hook(harness, "10-first", f"echo 10 >> {log}; cat >> {log}")  # stdin is /dev/null
    hook(harness, "15-disabled", f"echo 15 >> {log}", mode=0o644)
    (harness.paths.pre_reboot / "17-a-directory").mkdir()
    site.publish(site.release("1.1.0"))

    def reboot() -> None:
        with log.open("a") as f:
            f.write("reboot\n")

    daemon = harness.daemon(reboot=reboot)
    with caplog.at_level(logging.INFO, logger="updater.service.daemon"):
        daemon.run(iterations=1)
    # Each executable hook once, in name order, then the reboot.
    assert log.read_text() == "10\n20 1.0.0 1.1.0 immediate clean\nreboot\n"
    assert "pre-reboot hook 20-drain: ok (drained)" in caplog.text
    assert daemon.path == PATHS["immediate"]


def test_a_failing_hook_postpones_the_reboot_and_gives_the_slot_back(
    harness: Harness,
    site: Site,
    fake: FakeMachine,
    tmp_path: Path,
    etcd: EtcdServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    group = "pre-reboot"
    harness.defaults(
        site.url,
        "etcd-lock",
        extra=f'[etcd_lock]\nendpoints = ["{etcd.url}"]\ngroup = "{group}"\nslots = 1\n',
    )
    drain = hook(
        harness,
        "50-drain",
        "echo 'evicting pod web-1'; echo 'error: cannot evict pod web-1: disruption budget' >&2"
        "; exit 1",
    )
    after = tmp_path / "after-ran"
    hook(harness, "60-after", f"touch {after}")
    site.publish(site.release("1.1.0"))
    daemon = harness.daemon()
    with caplog.at_level(logging.INFO, logger="updater.service.daemon"):
        daemon.run(iterations=1)
    assert harness.reboots == 0 and not after.exists()  # hooks after a failure do not run
    assert daemon.state == DaemonState(
        Phase.WAITING,
        version="1.1.0",
        reason="pre-reboot hook 50-drain failed (exit status 1)",
        retry_after=HOOK_RETRY,
    )
    assert harness.slept == [HOOK_RETRY]  # shorter than the 600 s interval
    assert (
        "pre-reboot hook 50-drain: FAILED: exit status 1: evicting pod web-1\n"
        "error: cannot evict pod web-1: disruption budget; the reboot waits" in caplog.text
    )
    # The slot went back: one node whose drain fails does not hold the fleet's lock.
    sem = SemaphoreClient(EtcdStore([etcd.url]), group)
    assert sem.show()[0].holders == ()
    # berth-update status says why the reboot waits, and when it is tried again.
    status = make_agent(fake, site).status()
    assert status.reboot_held is not None
    assert status.reboot_held.startswith("1.1.0: hook 50-drain: exit status 1: evicting pod web-1")
    assert "; retrying at " in status.reboot_held
    assert "reboot waits: 1.1.0: hook 50-drain" in format_status(status)
    assert status.to_json()["reboot_held"] == status.reboot_held

    # The operator fixes the hook: the next try takes the slot again, runs the hooks, reboots.
    drain.write_text("#!/bin/sh\necho drained\n")
    daemon.run(iterations=1)
    assert harness.reboots == 1 and after.exists()
    assert sem.show()[0].holders == (lock_id(MACHINE_ID),)
    assert make_agent(fake, site).status().reboot_held is None
    assert daemon.path == PATHS["hook fails, then passes"]


def test_a_hook_that_hangs_is_killed_with_its_children(
    harness: Harness,
    site: Site,
    fake: FakeMachine,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    harness.paths.override.write_text("[update]\ninterval = 120\n")
    child = tmp_path / "child.pid"
    hook(harness, "50-hangs", f"echo draining; sleep 300 & echo $! > {child}; sleep 300")
    site.publish(site.release("1.1.0"))
    daemon = harness.daemon(jitter=0.999999, hook_timeout=1.0)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="updater.service.daemon"):
        daemon.run(iterations=1)
    assert time.monotonic() - started < 60
    assert harness.reboots == 0
    assert gone(int(child.read_text()))  # the hook's background child died with it
    assert daemon.state.phase is Phase.WAITING
    assert daemon.state.reason == "pre-reboot hook 50-hangs failed (timed out after 1 s)"
    assert harness.slept == [120.0]  # the interval, shorter than HOOK_RETRY
    assert "pre-reboot hook 50-hangs: FAILED: timed out after 1 s: draining" in caplog.text
    held = make_agent(fake, site).status().reboot_held
    assert held is not None and "hook 50-hangs: timed out after 1 s: draining" in held
