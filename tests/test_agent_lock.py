"""Two actors at once: the agent's one lock (updater/update/lock.py) between real processes.

Each holder is a real process (a forked child running an apply that pauses in the middle of
writing slot B until the test lets it go, or the daemon with its own worker child); the second
actor is `berth-update` (updater.cli.main) in another forked child, or the daemon. What is
asserted: the second one waits, saying whom for and what it does, or ends with the documented
message; each payload file is fetched (and the slot written) once; nothing is written beside the
holder.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Harness
from tests.support.machine import FakeMachine, Site, boot_into_update, make_agent
from updater.cli import main
from updater.disk.slots import SlotState
from updater.release.version import Version
from updater.service.daemon import Phase
from updater.service.notify import Notifier
from updater.update.lock import HOLDER_NAME, Actor, AgentLock, BusyError, read_holder
from updater.update.state import load_state, state_path

TIMEOUT = 60.0
FORK = multiprocessing.get_context("fork")
PAYLOAD = ("root.erofs", "root.verity", "uki.efi")


def wait_for(what: str, predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def gets(site: Site) -> dict[str, int]:
    """GET requests per payload file: each must be fetched once, by the one writer."""
    counts = dict.fromkeys(PAYLOAD, 0)
    for r in site.server.requests():
        for name in PAYLOAD:
            if r.request.startswith("GET ") and f".{name} " in r.request:
                counts[name] += 1
    return counts


class Pause:
    """A gate between processes: the paused side says it got there (`reached`) and waits until
    the test opens it (`go`)."""

    def __init__(self, base: Path) -> None:
        self.reached_file, self.go_file = base / "reached", base / "go"

    def wait_here(self) -> None:
        self.reached_file.touch()
        deadline = time.monotonic() + TIMEOUT
        while not self.go_file.exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    def reached(self) -> bool:
        return self.reached_file.exists()

    def go(self) -> None:
        self.go_file.touch()


def _paused_apply(fake: FakeMachine, site: Site, pause: Pause, out: Path) -> None:
    """The child: `berth-update apply` (as the agent), paused in its first payload file."""
    agent = make_agent(fake, site)
    agent.actor = Actor("berth-update apply")
    first = [True]

    def progress(name: str, done: int, total: int, reused: int = 0) -> None:
        if first[0]:
            first[0] = False
            pause.wait_here()

    try:
        applied = agent.apply(progress=progress)
        out.write_text(f"installed {applied.version} into slot {applied.slot}")
    except Exception as e:
        out.write_text(f"error: {e}")


class Holder:
    """A child process holding the lock in the middle of an apply."""

    def __init__(self, tmp: Path, fake: FakeMachine, site: Site) -> None:
        tmp.mkdir()
        self.pause = Pause(tmp)
        self.out = tmp / "result"
        self.process = FORK.Process(target=_paused_apply, args=(fake, site, self.pause, self.out))
        self.process.start()
        wait_for("the apply to pause while writing", self.pause.reached)

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def finish(self) -> str:
        self.pause.go()
        self.process.join(TIMEOUT)
        assert self.process.exitcode == 0
        return self.out.read_text()


@pytest.fixture
def holder(tmp_path: Path, fake: FakeMachine, site: Site) -> Iterator[Holder]:
    site.publish(site.release("1.1.0"))
    h = Holder(tmp_path / "holder", fake, site)
    yield h
    h.pause.go()
    h.process.join(TIMEOUT)
    if h.process.is_alive():
        h.process.kill()


def _cli(fake: FakeMachine, site: Site, args: list[str], out: Path, err: Path) -> None:
    with out.open("w") as o, err.open("w") as e:
        code = main(args, agent_factory=lambda: make_agent(fake, site), out=o, err=e)
    raise SystemExit(code)


class Cli:
    """`berth-update ARGS` in a process of its own, its stderr readable while it runs."""

    count = 0

    def __init__(self, fake: FakeMachine, site: Site, *args: str) -> None:
        Cli.count += 1
        base = fake.base / f"cli-{Cli.count}"
        self.out_file, self.err_file = base.with_suffix(".out"), base.with_suffix(".err")
        self.process = FORK.Process(
            target=_cli, args=(fake, site, list(args), self.out_file, self.err_file)
        )
        self.process.start()

    @property
    def running(self) -> bool:
        return self.process.is_alive()

    @property
    def out(self) -> str:
        return self.out_file.read_text() if self.out_file.exists() else ""

    @property
    def err(self) -> str:
        return self.err_file.read_text() if self.err_file.exists() else ""

    def says(self, text: str) -> bool:
        return text in self.err

    def join(self) -> int:
        self.process.join(TIMEOUT)
        if self.process.is_alive():
            self.process.kill()
            raise AssertionError("the command did not end")
        assert self.process.exitcode is not None
        return self.process.exitcode


def run_cli(fake: FakeMachine, site: Site, *args: str) -> tuple[int, str, str]:
    cli = Cli(fake, site, *args)
    code = cli.join()
    return code, cli.out, cli.err


def doing(who: str, pid: int, what: str) -> str:
    return f"{who} (pid {pid}), {what} since "


def test_a_second_apply_waits_then_finds_it_installed(
    holder: Holder, fake: FakeMachine, site: Site
) -> None:
    lock_dir = fake.run / "berth"
    held = read_holder(lock_dir)
    assert held is not None and held.pid == holder.pid
    assert held.describe().startswith(
        doing("berth-update apply", holder.pid, "applying 1.1.0: writing slot B")
    )

    second = Cli(fake, site, "apply")
    waiting = "berth-update: waiting for " + doing(
        "berth-update apply", holder.pid, "applying 1.1.0: writing slot B"
    )
    wait_for("the second apply to say whom it waits for", lambda: second.says(waiting))
    time.sleep(0.5)  # long enough for a second writer to start, were there one
    assert second.running
    _a, b = fake.slots()
    assert b.state is SlotState.WRITING  # the holder's scratch, nobody else's

    assert holder.finish() == "installed 1.1.0 into slot B"
    assert second.join() == 0
    assert second.out == (
        "1.1.0 is already installed, pending reboot (slot B, berth_1.1.0+3.efi)\n"
    )
    assert gets(site) == dict.fromkeys(PAYLOAD, 1)  # the slot was written once
    assert fake.boot_order() == ("berth_1.1.0+3.efi", "berth_1.0.0.efi")
    state = load_state(state_path(fake.var))
    assert state.pending is not None and state.pending.slot == "B"
    assert state.last_check is not None
    assert state.last_check.result == "1.1.0 already installed, pending reboot"
    assert not (lock_dir / HOLDER_NAME).exists()


def test_no_wait_ends_at_once_naming_the_holder_and_status_shows_it(
    holder: Holder, fake: FakeMachine, site: Site
) -> None:
    busy = "busy: " + doing("berth-update apply", holder.pid, "applying 1.1.0: writing slot B")
    for command in (["apply", "--no-wait"], ["check", "--no-wait"], ["rollback", "--no-wait"]):
        started = time.monotonic()
        code, out, err = run_cli(fake, site, *command)
        assert (code, out) == (1, ""), command
        assert err.startswith(f"berth-update: {busy}") and err.count("\n") == 1, err
        assert time.monotonic() - started < 5.0
    # status takes no lock: it answers at once and shows who is at work.
    code, out, _ = run_cli(fake, site, "status")
    assert code == 0
    assert f"busy:         {busy.removeprefix('busy: ')}" in out
    code, out, _ = run_cli(fake, site, "status", "--json")
    assert json.loads(out)["busy"].startswith(busy.removeprefix("busy: "))

    assert holder.finish() == "installed 1.1.0 into slot B"
    assert gets(site) == dict.fromkeys(PAYLOAD, 1)
    code, out, _ = run_cli(fake, site, "status")
    assert code == 0 and "busy:" not in out


def test_rollback_during_an_apply_waits_then_refuses_on_the_new_state(
    tmp_path: Path, fake: FakeMachine, site: Site
) -> None:
    # Booted 1.1.0 from slot B, blessed; slot A holds 1.0.0 to go back to.
    boot_into_update(fake, site, "1.1.0")
    (fake.entry_dir / "berth_1.1.0+3.efi").rename(fake.entry_dir / "berth_1.1.0.efi")
    assert make_agent(fake, site).after_boot().blessed == Version(1, 1, 0)
    # An apply of 1.2.0 writes over slot A; the operator rolls back meanwhile.
    site.publish(site.release("1.2.0"))
    holder = Holder(tmp_path / "holder", fake, site)
    try:
        rollback = Cli(fake, site, "rollback")
        waiting = "berth-update: waiting for " + doing(
            "berth-update apply", holder.pid, "applying 1.2.0: writing slot A"
        )
        wait_for("the rollback to wait for the apply", lambda: rollback.says(waiting))
        assert rollback.running
        assert holder.finish() == "installed 1.2.0 into slot A"
    finally:
        holder.pause.go()
    assert rollback.join() == 1
    assert rollback.err.endswith(
        "berth-update: refused to roll back: slot A now holds the update 1.2.0, installed and "
        "waiting for its reboot; the version it held before is gone, so there is no previous "
        "version to go back to\n"
    )
    # The rollback changed nothing: the update boots next, 1.1.0 is not marked bad.
    assert fake.boot_order() == ("berth_1.2.0+3.efi", "berth_1.1.0.efi")
    assert load_state(state_path(fake.var)).bad == ()


class PausingNotifier(Notifier):
    """The daemon's sd_notify, pausing the worker child at its first download progress: the
    worker then holds the lock with slot B half written."""

    def __init__(self, pause: Pause) -> None:
        super().__init__("")
        self.pause = pause

    def send(self, fields: Any) -> None:
        if fields.get("STATUS", "").startswith("downloading 1.1.0: ") and not self.pause.reached():
            self.pause.wait_here()


def _run_daemon(harness: Harness, pause: Pause) -> None:
    harness.daemon(notifier=PausingNotifier(pause)).run(iterations=1)


def test_cli_apply_waits_for_the_daemon_worker(
    tmp_path: Path, fake: FakeMachine, site: Site
) -> None:
    harness = Harness(tmp_path, fake, site, None)
    harness.defaults(site.url)
    site.publish(site.release("1.1.0"))
    (tmp_path / "daemon").mkdir()
    pause = Pause(tmp_path / "daemon")
    daemon = FORK.Process(target=_run_daemon, args=(harness, pause))
    daemon.start()
    try:
        wait_for("the daemon's worker to pause while writing", pause.reached)
        held = read_holder(fake.run / "berth")
        assert held is not None and held.who == "berth-update daemon"
        cli = Cli(fake, site, "apply")
        waiting = "berth-update: waiting for " + doing(
            "berth-update daemon", held.pid, "applying 1.1.0: writing slot B"
        )
        wait_for("the CLI to wait for the daemon", lambda: cli.says(waiting))
        assert cli.running
        pause.go()
        assert cli.join() == 0
        daemon.join(TIMEOUT)
        assert daemon.exitcode == 0
    finally:
        pause.go()
        daemon.join(TIMEOUT)
    assert cli.out.startswith("1.1.0 is already installed, pending reboot")
    assert gets(site) == dict.fromkeys(PAYLOAD, 1)
    assert fake.boot_order() == ("berth_1.1.0+3.efi", "berth_1.0.0.efi")


def test_the_daemon_waits_a_bounded_time_then_backs_off(
    tmp_path: Path, holder: Holder, fake: FakeMachine, site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    harness = Harness(tmp_path, fake, site, None)
    harness.defaults(site.url)
    daemon = harness.daemon(lock_wait=0.5)
    caplog.set_level(logging.INFO)
    started = time.monotonic()
    daemon.run(iterations=1)
    assert time.monotonic() - started < 10.0  # two bounded waits, not the apply's length
    assert daemon.state.phase is Phase.BACKOFF and daemon.state.resume is Phase.JUDGING
    busy = "busy after waiting 0.5 s: " + doing(
        "berth-update apply", holder.pid, "applying 1.1.0: writing slot B"
    )
    assert f"update failed (1 in a row): {busy}" in caplog.text
    assert harness.slept == [60.0]  # the normal backoff
    assert harness.reboots == 0

    # Once the operator's apply is done, the daemon finds it installed: no second download.
    assert holder.finish() == "installed 1.1.0 into slot B"
    daemon.run(iterations=1)
    assert harness.reboots == 1
    assert gets(site) == dict.fromkeys(PAYLOAD, 1)


def test_a_killed_holder_leaves_no_lock_behind(
    holder: Holder, fake: FakeMachine, site: Site
) -> None:
    os.kill(holder.pid, signal.SIGKILL)
    holder.process.join(TIMEOUT)
    lock_dir = fake.run / "berth"
    assert (lock_dir / HOLDER_NAME).exists()  # its description stays, naming a dead process
    assert read_holder(lock_dir) is None
    code, out, _ = run_cli(fake, site, "status")
    assert code == 0 and "busy:" not in out
    # The kernel released the lock with the process: the next apply needs no waiting.
    code, out, err = run_cli(fake, site, "apply", "--no-wait")
    assert code == 0, err
    assert out.startswith("installed 1.1.0 into slot B")


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"\xff\xfe not utf-8",
        b"[" * 100_000,
        b'{"pid": "x"}',
        b'{"pid": 1, "who": "w", "action": "a", "phase": "p", "since": 1e300}',
        b'{"pid": -1, "who": "w", "action": "a", "phase": "p", "since": 0}',
    ],
)
def test_a_garbage_holder_file_is_no_holder(tmp_path: Path, text: bytes) -> None:
    (tmp_path / HOLDER_NAME).write_bytes(text)
    assert read_holder(tmp_path) is None
    # A waiting actor still names someone, without crashing on the file.
    with AgentLock(tmp_path, Actor("first")).hold("applying"):
        (tmp_path / HOLDER_NAME).write_bytes(text)
        second = AgentLock(tmp_path, Actor("second", 0.0))
        with pytest.raises(BusyError, match=r"^busy: another berth-update"), second.hold("x"):
            pass


def test_a_nested_hold_is_part_of_the_outer_one(tmp_path: Path) -> None:
    lock = AgentLock(tmp_path, Actor("one", 0.0))
    with lock.hold("applying"):
        with lock.hold("checking"):
            lock.step("writing slot B", action="applying 2.0.0")
        held = read_holder(tmp_path)
        assert held is not None and held.pid == os.getpid()
        assert held.describe().startswith("one (pid ")
        assert ", applying 2.0.0: writing slot B since " in held.describe()
    assert read_holder(tmp_path) is None
