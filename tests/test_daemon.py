"""The daemon loop against a fake machine and a real signed repository served by nginx, with a
fake sleep (the loop never waits), an injected reboot and a real sd_notify datagram socket."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemu.vm import free_port
from tests.support.daemon import INTERVAL, Harness
from tests.support.machine import FakeMachine, Site, make_agent, release_manifest
from updater.config import Strategy
from updater.disk import slots
from updater.release.version import Version
from updater.service.notify import Notifier, socket_address
from updater.update.state import load_state, state_path


class Listener:
    """The service manager's side of $NOTIFY_SOCKET, drained by a thread as systemd does."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(path))
        self.socket.settimeout(0.1)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.socket.recv(4096).decode())
            except TimeoutError:
                continue

    def close(self) -> list[str]:
        if self._stop.is_set():
            return self.messages
        self._stop.set()
        self._thread.join()
        self.socket.setblocking(False)
        while True:  # what arrived after the thread's last read
            try:
                self.messages.append(self.socket.recv(4096).decode())
            except BlockingIOError:
                break
        self.socket.close()
        return self.messages


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    listening = Listener(tmp_path / "notify")
    yield listening
    listening.close()


@pytest.fixture
def harness(tmp_path: Path, fake: FakeMachine, site: Site) -> Harness:
    h = Harness(tmp_path, fake, site, None)
    h.defaults(site.url)
    return h


def payload_gets(site: Site) -> int:
    payload = (".root.erofs ", ".root.verity ", ".uki.efi ")
    return sum(
        1
        for r in site.server.requests()
        if r.request.startswith("GET ") and any(p in r.request for p in payload)
    )


def test_immediate_installs_and_reboots(
    harness: Harness, site: Site, fake: FakeMachine, listener: Listener
) -> None:
    site.publish(site.release("1.1.0"))
    harness.notify = str(listener.path)
    harness.daemon().run(iterations=1)
    assert fake.boot_order() == ("berth_1.1.0+3.efi", "berth_1.0.0.efi")
    assert harness.reboots == 1
    assert (fake.run / "reboot-required").exists()
    messages = listener.close()
    assert messages[0] == "READY=1\nSTATUS=started"
    statuses = [m.removeprefix("STATUS=") for m in messages[1:]]
    assert "downloading 1.1.0" in statuses
    assert "downloading 1.1.0: root.erofs 100%" in statuses
    assert "installed 1.1.0, rebooting" in statuses
    assert statuses[-1].startswith("idle, next check at ")
    # jitter 0.5 is the middle of ±10%
    assert harness.slept == [pytest.approx(INTERVAL)]


def test_off_installs_once_and_only_announces(
    harness: Harness, site: Site, fake: FakeMachine
) -> None:
    harness.defaults(site.url, strategy="off")
    site.publish(site.release("1.1.0"))
    daemon = harness.daemon()
    assert daemon.config.strategy is Strategy.OFF
    daemon.run(iterations=1)
    assert harness.reboots == 0
    assert (fake.run / "reboot-required").exists()
    state = load_state(state_path(fake.var))
    assert state.pending is not None and state.pending.version == Version(1, 1, 0)
    # The next checks see the same candidate but do not download it again.
    gets = payload_gets(site)
    (fake.run / "reboot-required").unlink()
    daemon.run(iterations=2)
    assert payload_gets(site) == gets
    assert harness.reboots == 0 and (fake.run / "reboot-required").exists()


def test_jitter_spreads_the_interval(harness: Harness, site: Site) -> None:
    site.publish(site.release("1.0.0"))  # the booted version: up to date, a normal interval
    low, high = harness.daemon(jitter=0.0), harness.daemon(jitter=0.999999)
    low.run(iterations=1)
    high.run(iterations=1)
    assert harness.slept == [pytest.approx(0.9 * INTERVAL), pytest.approx(1.1 * INTERVAL, rel=1e-5)]


def test_backs_off_while_the_repository_is_down_then_recovers(
    harness: Harness, site: Site, fake: FakeMachine, caplog: pytest.LogCaptureFixture
) -> None:
    harness.defaults(f"http://127.0.0.1:{free_port()}/")
    site.publish(site.release("1.1.0"))
    daemon = harness.daemon()
    with caplog.at_level(logging.ERROR, logger="updater.service.daemon"):
        daemon.run(iterations=5)
    # 1 min doubling, capped at the interval (600 s); the loop survived every failure.
    assert harness.slept == [60.0, 120.0, 240.0, 480.0, 600.0]
    assert daemon.failures == 5
    assert "update failed (5 in a row)" in caplog.text
    # The operator fixes the URL: the next iteration (config reloaded) installs and resets.
    harness.paths.override.write_text(f'[update]\nurl = "{site.url}"\n')
    daemon.run(iterations=1)
    assert daemon.failures == 0 and harness.reboots == 1
    assert fake.boot_order()[0] == "berth_1.1.0+3.efi"
    assert harness.slept[-1] == pytest.approx(INTERVAL)


def test_keeps_the_last_good_config_when_the_override_breaks(
    harness: Harness, site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    harness.paths.override.write_text('[update]\nstrategy = "off"\n')
    daemon = harness.daemon()
    daemon.run(iterations=1)
    assert daemon.config.strategy is Strategy.OFF
    harness.paths.override.write_text('[update]\nstrategy = "sometimes"\n')
    site.publish(site.release("1.1.0"))
    with caplog.at_level(logging.ERROR, logger="updater.service.daemon"):
        daemon.run(iterations=1)
    assert daemon.config.strategy is Strategy.OFF
    assert "key 'update.strategy'" in caplog.text and "keeping the last good" in caplog.text
    assert harness.reboots == 0  # still "off": the broken file did not switch to the default
    assert daemon.failures == 0


def test_broken_override_at_start_uses_the_image_defaults(harness: Harness) -> None:
    harness.paths.override.write_text("[update\n")
    assert harness.daemon().config.strategy is Strategy.IMMEDIATE


def test_nothing_is_installed_while_the_booted_version_is_on_trial(
    harness: Harness, site: Site, fake: FakeMachine
) -> None:
    first = site.release("1.1.0")
    site.publish(first)
    make_agent(fake, site).apply()
    fake.boot(Version(1, 1, 0), release_manifest(first).roothash)  # booted with a counter
    site.publish(site.release("1.2.0"))
    daemon = harness.daemon()
    daemon.run(iterations=2)
    # Slot A holds 1.0.0, the fallback: it must not be overwritten before 1.1.0 is blessed.
    assert fake.boot_order() == ("berth_1.1.0+3.efi", "berth_1.0.0.efi")
    assert harness.slept == [60.0, 60.0] and harness.reboots == 0
    # systemd-bless-boot drops the counter; the next iteration blesses, prunes and updates.
    (fake.entry_dir / "berth_1.1.0+3.efi").rename(fake.entry_dir / "berth_1.1.0.efi")
    daemon.run(iterations=1)
    assert fake.boot_order() == ("berth_1.2.0+3.efi", "berth_1.1.0.efi")
    assert harness.reboots == 1


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"berth-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        Notifier("@" + name).send({"READY": "1", "STATUS": "idle"})
        assert s.recv(4096) == b"READY=1\nSTATUS=idle"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert not Notifier("").enabled


def test_a_pending_slot_that_changed_after_install_never_boots(
    harness: Harness, site: Site, fake: FakeMachine
) -> None:
    harness.defaults(site.url, strategy="off")
    site.publish(site.release("1.1.0"))
    daemon = harness.daemon()
    daemon.run(iterations=1)
    assert fake.boot_order() == ("berth_1.1.0+3.efi", "berth_1.0.0.efi")
    # Something flips bytes in the inactive slot while the update waits for its reboot.
    with fake.disk.open("r+b") as disk:
        slot_b = slots.read_slots(disk)[1]
        disk.seek(slot_b.data_offset + 4096)
        block = disk.read(16)
        disk.seek(slot_b.data_offset + 4096)
        disk.write(bytes(b ^ 0xFF for b in block))
    harness.paths.override.write_text('[update]\nstrategy = "immediate"\n')
    daemon.run(iterations=1)
    assert harness.reboots == 0
    assert fake.boot_order() == ("berth_1.0.0.efi",)
    state = load_state(state_path(fake.var))
    assert state.pending is None
    assert "slot B changed after it was installed" in state.bad[0].reason
    # Marked bad: later iterations neither reinstall nor reboot into it.
    daemon.run(iterations=1)
    assert harness.reboots == 0 and fake.boot_order() == ("berth_1.0.0.efi",)
