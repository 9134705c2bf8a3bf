"""The daemon's reboot strategies on a fake machine with a real signed repository: a maintenance
window on a fake clock, FleetLock through berth-lockd on a real etcd (denied, granted, held over
the reboot, released once blessed, and a slot left from before the reboot released at start),
etcd-lock directly, and the warning to logged-in users."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.support.daemon import INTERVAL, PATHS, Harness
from tests.support.etcd import EtcdServer
from tests.support.machine import MACHINE_ID, FakeMachine, Site, release_manifest
from updater.reboot.etcdlock import EtcdStore
from updater.reboot.gate import LOCK_RETRY_START
from updater.reboot.lockd import LockServer
from updater.reboot.semaphore import Semaphore, SemaphoreClient
from updater.release.identity import lock_id
from updater.release.version import Version
from updater.service.daemon import DaemonState, Phase

ME = lock_id(MACHINE_ID)


@pytest.fixture
def harness(tmp_path: Path, fake: FakeMachine, site: Site) -> Harness:
    return Harness(tmp_path, fake, site, None)


def test_window_waits_for_the_opening_then_reboots(
    harness: Harness, site: Site, fake: FakeMachine
) -> None:
    # The next whole minute: after the publish below opened the wave, and easy to write down.
    now = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
    harness.offset = now.timestamp() - time.time()
    opens = now + timedelta(minutes=5)
    day = opens.strftime("%a")
    harness.defaults(
        site.url,
        "window",
        extra=f'[[window]]\ndays = ["{day}"]\nstart_time = "{opens:%H:%M}"\nlength_minutes = 10\n',
    )
    site.publish(site.release("1.1.0"))
    daemon = harness.daemon()
    daemon.run(iterations=1)
    assert harness.reboots == 0 and (fake.run / "reboot-required").exists()
    # To the opening (less the seconds this test took), not the 600 s interval.
    assert harness.slept == [pytest.approx(301, abs=10)]
    daemon.run(iterations=1)  # the fake sleep moved the clock into the window
    assert harness.reboots == 1
    assert harness.slept[-1] == pytest.approx(INTERVAL)
    assert daemon.path == PATHS["window"]


@pytest.fixture
def lockd(etcd: EtcdServer) -> Iterator[LockServer]:
    server = LockServer(("127.0.0.1", 0), EtcdStore([etcd.url]), 1).start()
    yield server
    server.stop()


def test_fleet_lock_through_berth_lockd(
    harness: Harness,
    site: Site,
    fake: FakeMachine,
    etcd: EtcdServer,
    lockd: LockServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    group = "daemon-fleet"
    harness.defaults(
        site.url, "fleet-lock", extra=f'[fleet_lock]\nbase_url = "{lockd.url}"\ngroup = "{group}"\n'
    )
    sem = SemaphoreClient(EtcdStore([etcd.url]), group)
    # This machine took a slot before its last reboot and never said steady-state.
    assert sem.acquire(ME).ok
    daemon = harness.daemon()
    daemon.run(iterations=1)
    assert sem.show()[0] == Semaphore(1, ())  # released at start: the boot is judged
    # Given back: the next try starts from the check (which the empty repository failed).
    assert daemon.state == DaemonState(Phase.BACKOFF, failures=1, resume=Phase.CHECKING)

    # Another machine holds the only slot: the update is installed but the reboot waits.
    assert sem.acquire("other").ok
    first = site.release("1.1.0")
    site.publish(first)
    with caplog.at_level(logging.INFO, logger="updater.service.daemon"):
        daemon.run(iterations=2)
    assert harness.reboots == 0 and (fake.run / "reboot-required").exists()
    assert "failed_lock_semaphore_full" not in caplog.text  # the reason is the server's text
    assert "semaphore of group daemon-fleet full: 1 of 1 slots held" in caplog.text
    assert harness.slept[-2:] == [LOCK_RETRY_START, 2 * LOCK_RETRY_START]

    # The other machine is done: this one gets the slot and reboots holding it.
    assert sem.release("other").changed
    daemon.run(iterations=1)
    assert harness.reboots == 1
    assert sem.show()[0].holders == (ME,)
    assert daemon.path == PATHS["fleet-lock"]

    # It boots the new version on trial: the slot stays held until the version is blessed.
    new = next(e for e in fake.boot_order() if e.startswith("berth_1.1.0"))
    fake.boot(Version(1, 1, 0), release_manifest(first).roothash)
    after = harness.daemon()
    after.run(iterations=1)
    assert after.state == DaemonState(Phase.ON_TRIAL) and sem.show()[0].holders == (ME,)
    (fake.entry_dir / new).rename(fake.entry_dir / "berth_1.1.0.efi")  # systemd-bless-boot
    after.run(iterations=1)
    assert after.state == DaemonState(Phase.IDLE) and sem.show()[0].holders == ()
    assert after.path == PATHS["fleet-lock, after the reboot"]


def test_etcd_lock_takes_a_slot_directly(
    harness: Harness, site: Site, etcd: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    group = "daemon-etcd"
    harness.defaults(
        site.url,
        "etcd-lock",
        extra=f'[etcd_lock]\nendpoints = ["{etcd.url}"]\ngroup = "{group}"\nslots = 2\n',
    )
    site.publish(site.release("1.1.0"))
    first = harness.daemon()
    first.run(iterations=1)
    assert harness.reboots == 1 and first.path == PATHS["immediate"]
    sem = SemaphoreClient(EtcdStore([etcd.url]), group)
    assert sem.show() == (Semaphore(2, (ME,)), True)  # created with the configured slot count

    # A missing TLS file is an error naming the key; the daemon logs it and backs off.
    harness.paths.override.write_text('[etcd_lock]\nca_file = "/nonexistent/ca.pem"\n')
    daemon = harness.daemon()
    with caplog.at_level(logging.ERROR, logger="updater.service.daemon"):
        daemon.run(iterations=1)
    assert "etcd_lock.ca_file: /nonexistent/ca.pem does not exist" in caplog.text
    assert daemon.path == PATHS["etcd-lock without its CA file"]
    assert daemon.state == DaemonState(Phase.BACKOFF, failures=1, resume=Phase.RELEASING)


def test_logged_in_users_are_warned_and_given_the_delay(
    harness: Harness, site: Site, tmp_path: Path
) -> None:
    harness.defaults(site.url)
    harness.paths.override.write_text('[update]\nreboot_delay = "2m"\n')
    heard = tmp_path / "wall.txt"
    wall = tmp_path / "wall"
    wall.write_text(f"#!/bin/sh\ncat > {heard}\n")
    wall.chmod(0o755)
    site.publish(site.release("1.1.0"))
    warned = harness.daemon(sessions=lambda: 1, wall=[str(wall)])
    warned.run(iterations=1)
    assert harness.reboots == 1 and warned.path == PATHS["immediate"]
    assert harness.slept[0] == 120  # the warning delay, before the reboot
    assert "reboot this machine in 2 minute(s) to start version 1.1.0" in heard.read_text()
    # Nobody logged in: no wall, no wait.
    heard.unlink()
    site.publish(site.release("1.2.0"))
    before = len(harness.slept)
    harness.daemon(sessions=lambda: 0, wall=[str(wall)]).run(iterations=1)
    assert not heard.exists() and harness.slept[before:] == [pytest.approx(INTERVAL)]
