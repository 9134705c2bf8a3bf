"""The daemon loop against a fake machine and a real signed repository served by nginx, with a
fake sleep (the loop never waits), an injected reboot and a real sd_notify datagram socket."""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qemu.vm import free_port
from tests.support.daemon import INTERVAL, PATHS, START, Harness, path
from tests.support.machine import FakeMachine, Site, boot_into_update
from updater.config import Strategy
from updater.disk import slots
from updater.errors import UpdateError
from updater.release.version import Version
from updater.service.daemon import (
    TRANSITIONS,
    DaemonState,
    IllegalTransition,
    Phase,
)
from updater.service.notify import Notifier, socket_address
from updater.service.worker import run_in_child
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
    daemon = harness.daemon()
    daemon.run(iterations=1)
    assert daemon.path == PATHS["immediate"]
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
    assert daemon.path == PATHS["off"]


def test_jitter_spreads_the_interval(harness: Harness, site: Site) -> None:
    site.publish(site.release("1.0.0"))  # the booted version: up to date, a normal interval
    low, high = harness.daemon(jitter=0.0), harness.daemon(jitter=0.999999)
    low.run(iterations=1)
    high.run(iterations=1)
    assert harness.slept == [pytest.approx(0.9 * INTERVAL), pytest.approx(1.1 * INTERVAL, rel=1e-5)]
    assert low.path == high.path == PATHS["up to date"]


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
    assert daemon.state == DaemonState(Phase.BACKOFF, failures=5, resume=Phase.CHECKING)
    assert "update failed (5 in a row)" in caplog.text
    # The operator fixes the URL: the next iteration (config reloaded) installs and resets.
    harness.paths.override.write_text(f'[update]\nurl = "{site.url}"\n')
    daemon.run(iterations=1)
    assert daemon.state.failures == 0 and harness.reboots == 1
    assert fake.boot_order()[0] == "berth_1.1.0+3.efi"
    assert harness.slept[-1] == pytest.approx(INTERVAL)
    assert daemon.path == PATHS["repository down"]


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
    assert daemon.state.failures == 0
    assert daemon.path == PATHS["last good config"]


def test_broken_override_at_start_uses_the_image_defaults(harness: Harness) -> None:
    harness.paths.override.write_text("[update\n")
    assert harness.daemon().config.strategy is Strategy.IMMEDIATE


# What an override may hold that no parser takes: each is refused naming the file (and the key,
# where there is one), and the daemon goes on with what it had.
BROKEN_OVERRIDES = {
    "not UTF-8": (b'[update]\nstrategy = "off\xff"\n', "not UTF-8 text (byte 24)"),
    "nested too deeply": (b"[update]\nx = " + b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    "a 5000-digit number": (b"[update]\ninterval = " + b"9" * 5000, "not valid TOML"),
    "a billion days": (b'[update]\ninterval = "1000000000d"\n', "key 'update.interval'"),
    "a delay of 2^63 s": (b"[update]\nreboot_delay = 9223372036854775808\n", "reboot_delay"),
    "a float": (b"[update]\ninterval = 3600.5\n", "key 'update.interval'"),
    "a negative delay": (b"[update]\nreboot_delay = -1\n", "key 'update.reboot_delay'"),
    "slots out of range": (
        b'[update]\nstrategy = "etcd-lock"\n[etcd_lock]\nendpoints = ["http://e:2379"]\n'
        b"slots = 100000\n",
        "key 'etcd_lock.slots'",
    ),
    "a quote in the url": (b"[update]\nurl = 'https://u.example/\"x'\n", "key 'update.url'"),
    "a NUL in a file path": (
        b'[etcd_lock]\nca_file = "/etc/ca\\u0000.pem"\n',
        "key 'etcd_lock.ca_file'",
    ),
}


@pytest.mark.parametrize("content", BROKEN_OVERRIDES.values(), ids=BROKEN_OVERRIDES)
def test_an_override_no_parser_takes_is_refused_at_start_and_on_reload(
    harness: Harness, site: Site, caplog: pytest.LogCaptureFixture, content: tuple[bytes, str]
) -> None:
    data, message = content
    override = harness.paths.override
    override.write_bytes(data)
    with caplog.at_level(logging.ERROR, logger="updater.service.daemon"):
        daemon = harness.daemon()
        at_start = daemon.config
        assert at_start.strategy is Strategy.IMMEDIATE  # the image's defaults
        assert f"{override}" in caplog.text and message in caplog.text
        assert "using the image's defaults" in caplog.text
        # A good override, then the broken one again: the good one stays.
        override.write_text('[update]\nstrategy = "off"\n')
        daemon.run(iterations=1)
        assert daemon.config.strategy is Strategy.OFF
        caplog.clear()
        override.write_bytes(data)
        site.publish(site.release("1.1.0"))
        daemon.run(iterations=1)
    assert daemon.config.strategy is Strategy.OFF
    assert f"{override}" in caplog.text and message in caplog.text
    assert "keeping the last good configuration" in caplog.text
    assert harness.reboots == 0 and daemon.state.failures == 0
    # Every sleep is the interval the good configuration set, with its jitter.
    assert all(d <= INTERVAL * 1.1 for d in harness.slept)


def test_broken_image_defaults_run_without_a_repository_and_still_judge_the_boot(
    harness: Harness, fake: FakeMachine, caplog: pytest.LogCaptureFixture
) -> None:
    harness.paths.default.write_bytes(b'[update]\nurl = "\xc3"\n')
    with caplog.at_level(logging.INFO, logger="updater.service.daemon"):
        daemon = harness.daemon()
        daemon.run(iterations=1)
    assert daemon.config.url == ""
    assert f"{harness.paths.default}: not UTF-8 text" in caplog.text
    assert "running without an update repository" in caplog.text
    assert "no update repository configured" in caplog.text
    assert daemon.path == path(START, "RELEASING IDLE")


def test_nothing_is_installed_while_the_booted_version_is_on_trial(
    harness: Harness, site: Site, fake: FakeMachine
) -> None:
    boot_into_update(fake, site, "1.1.0")  # booted with a counter
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
    assert daemon.path == PATHS["on trial"]


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
    assert daemon.path == PATHS["slot changed"]


def test_without_a_repository_the_slot_goes_back_and_nothing_is_checked(
    harness: Harness, site: Site, fake: FakeMachine, caplog: pytest.LogCaptureFixture
) -> None:
    harness.defaults("")
    daemon = harness.daemon()
    with caplog.at_level(logging.INFO, logger="updater.service.daemon"):
        daemon.run(iterations=2)
    assert caplog.text.count("no update repository configured") == 2
    assert harness.slept == [pytest.approx(INTERVAL)] * 2
    # The operator names a repository: a new gate gives back its slot, then the check installs.
    site.publish(site.release("1.1.0"))
    harness.paths.override.write_text(f'[update]\nurl = "{site.url}"\n')
    daemon.run(iterations=1)
    assert harness.reboots == 1 and fake.boot_order()[0] == "berth_1.1.0+3.efi"
    assert daemon.path == PATHS["no repository"]


def test_a_boot_that_cannot_be_judged_is_judged_again(
    harness: Harness, site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    site.publish(site.release("1.0.0"))  # the booted version: up to date once judged
    calls = 0

    def flaky(work: Callable[[], Any]) -> Any:
        nonlocal calls
        calls += 1
        if calls <= 2:  # the judgement at start and the one of the first iteration
            raise UpdateError("cannot list boot entries in /boot/EFI/Linux: I/O error")
        return run_in_child(work)

    daemon = harness.daemon(worker=flaky)
    with caplog.at_level(logging.ERROR, logger="updater.service.daemon"):
        daemon.run(iterations=3)
    assert "cannot judge this boot: cannot list boot entries" in caplog.text
    assert "update failed (1 in a row): cannot list boot entries" in caplog.text
    assert harness.slept == [60.0, pytest.approx(INTERVAL), pytest.approx(INTERVAL)]
    assert daemon.state == DaemonState(Phase.IDLE)
    assert daemon.path == PATHS["judging fails"]


def test_a_failed_download_is_checked_for_again_after_a_backoff(
    harness: Harness, site: Site, fake: FakeMachine
) -> None:
    release = site.release("1.1.0")
    site.publish(release)
    payload = site.payload(release, "root.erofs")
    held = payload.with_name(payload.name + ".held")
    payload.rename(held)  # the mirror lost a file: apply refuses before writing anything
    daemon = harness.daemon()
    daemon.run(iterations=1)
    assert daemon.state == DaemonState(Phase.BACKOFF, failures=1, resume=Phase.CHECKING)
    assert harness.reboots == 0 and fake.boot_order() == ("berth_1.0.0.efi",)
    held.rename(payload)
    daemon.run(iterations=1)
    assert harness.reboots == 1 and fake.boot_order()[0] == "berth_1.1.0+3.efi"
    assert harness.slept == [60.0, pytest.approx(INTERVAL)]
    assert daemon.path == PATHS["download fails"]


def test_a_failed_reboot_gives_the_slot_back_and_tries_again(
    harness: Harness, site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    site.publish(site.release("1.1.0"))
    attempts = 0

    def reboot() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise UpdateError("cannot reboot with systemctl reboot: Transaction is destructive")

    daemon = harness.daemon(reboot=reboot)
    with caplog.at_level(logging.ERROR, logger="updater.service.daemon"):
        daemon.run(iterations=1)
    assert "update failed (1 in a row): cannot reboot" in caplog.text
    assert daemon.state == DaemonState(Phase.BACKOFF, failures=1, resume=Phase.RELEASING)
    # Installed already: the next iteration verifies the slot again and reboots.
    daemon.run(iterations=1)
    assert attempts == 2 and harness.slept == [60.0, pytest.approx(INTERVAL)]
    assert daemon.path == PATHS["reboot fails"]


def test_an_illegal_transition_is_a_bug_and_raises(harness: Harness) -> None:
    daemon = harness.daemon()
    with pytest.raises(IllegalTransition, match="cannot go from starting to rebooting"):
        daemon._enter(Phase.REBOOTING, version="1.1.0")
    assert daemon.state == DaemonState() and daemon.path == [Phase.STARTING]
    # Nor is a state whose data does not fit its phase.
    with pytest.raises(ValueError, match="only BACKOFF has one"):
        DaemonState(Phase.IDLE, resume=Phase.CHECKING)
    with pytest.raises(ValueError, match="version is None"):
        DaemonState(Phase.INSTALLING)


def test_every_allowed_transition_is_taken_by_a_scenario() -> None:
    assert set(TRANSITIONS) == set(Phase)
    allowed = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    taken = {pair for p in PATHS.values() for pair in itertools.pairwise(p)}
    assert taken == allowed
