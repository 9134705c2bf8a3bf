"""The one lock on what changes this machine's slots, its ESP and the agent's state.

An operator's `berth-update apply` and the daemon's worker are two processes that would
otherwise stream into the same inactive slot side by side (or one overwrite a slot the other
just verified and installed). The facade (updater.agent) takes this lock around every method
that changes anything: apply, check (it saves the state), verify_pending, after_boot,
reject_trial, rollback. `status` only reads and takes no lock.

- The lock is an flock on `<lock_dir>/agent.lock` (/run/berth: a tmpfs). The kernel drops it
  when the holder dies, so there is never a stale lock to clean up; the file itself is never
  removed (a lock on a replaced file guards nothing).
- The holder says who it is and what it does in `<lock_dir>/agent.holder` (JSON: pid, who,
  action, phase, started, since), replaced as its work moves through its steps, removed when it
  lets go. A second actor prints it while it waits ("waiting for berth-update daemon (pid 123),
  applying 2.0.0: writing slot B since 10:02:11"); `status` shows it as "busy". The file is only
  a description: a holder killed before it could remove it leaves one behind, which the next
  holder replaces and which a reader ignores once its pid is gone.
- Waiting: `Actor.wait` seconds (None: until the holder lets go; 0: not at all), then BusyError
  naming the holder. The CLI waits unless told `--no-wait`; the daemon's worker waits a bounded
  time, then backs off as after any error.

Standard library only: the resident daemon imports it (see service/worker.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from updater.errors import RefusedError, StorageError
from updater.files import write_file_atomic
from updater.release.document import json_object

log = logging.getLogger(__name__)

LOCK_NAME = "agent.lock"
HOLDER_NAME = "agent.holder"
# How often a waiting actor tries again (flock has no timeout) and looks at what the holder does.
POLL = 0.1


class BusyError(RefusedError):
    """Another actor holds the agent's lock and this one would not (or no longer) wait."""


def _say(text: str) -> None:
    log.warning("%s", text)


@dataclass(frozen=True)
class Actor:
    """Who takes the lock (as a second actor will read it) and how long it waits for it."""

    who: str = "berth-update"
    wait: float | None = None  # seconds; None: until the holder lets go; 0: not at all
    on_wait: Callable[[str], None] = field(default=_say, compare=False)  # "waiting for ..."


@dataclass(frozen=True)
class Holder:
    """What the holder file says."""

    pid: int
    who: str
    action: str
    phase: str
    since: float

    def describe(self) -> str:
        """ "berth-update daemon (pid 123), applying 2.0.0: writing slot B since 10:02:11"."""
        clock = datetime.fromtimestamp(self.since).strftime("%H:%M:%S")
        doing = f"{self.action}: {self.phase}" if self.phase else self.action
        return f"{self.who} (pid {self.pid}), {doing} since {clock}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    return True


def read_holder(lock_dir: Path) -> Holder | None:
    """Who holds the lock as its holder file says, or None (no file, an unreadable one, or one
    left by a process that is gone). Reads only: `status` calls it while another actor works."""
    path = lock_dir / HOLDER_NAME
    try:
        doc = json_object(path.read_bytes(), str(path), ValueError)
        holder = Holder(
            int(doc["pid"]),
            str(doc["who"]),
            str(doc["action"]),
            str(doc["phase"]),
            float(doc["since"]),
        )
        # datetime refuses a time it cannot show (a year beyond 9999): the file is garbage.
        holder.describe()
    except (OSError, ValueError, KeyError, TypeError, OverflowError):
        return None
    if holder.pid <= 0 or not _alive(holder.pid):
        return None
    return holder


class AgentLock:
    """The lock held for one facade call: `hold` takes it (waiting as the actor says), `step`
    tells the others what the holder does now."""

    def __init__(self, lock_dir: Path, actor: Actor) -> None:
        self.lock_dir = lock_dir
        self.actor = actor
        self._fd: int | None = None
        self._action = ""
        self._phase = ""
        self._since = 0.0

    @property
    def path(self) -> Path:
        return self.lock_dir / LOCK_NAME

    def _describe_holder(self) -> str:
        holder = read_holder(self.lock_dir)
        if holder is None or holder.pid == os.getpid():
            return "another berth-update (it has not said what it does yet)"
        return holder.describe()

    def _acquire(self, fd: int) -> None:
        actor = self.actor
        deadline = None if actor.wait is None else time.monotonic() + actor.wait
        said = ""
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            holder = self._describe_holder()
            if deadline is not None and time.monotonic() >= deadline:
                waited = f" after waiting {actor.wait:g} s" if actor.wait else ""
                raise BusyError(f"busy{waited}: {holder}")
            if holder != said:  # again whenever the holder moves on to another step
                actor.on_wait(f"waiting for {holder}")
                said = holder
            time.sleep(POLL)

    def _write(self) -> None:
        doc = {
            "pid": os.getpid(),
            "who": self.actor.who,
            "action": self._action,
            "phase": self._phase,
            "since": self._since,
        }
        try:
            write_file_atomic(self.lock_dir / HOLDER_NAME, json.dumps(doc).encode())
        except OSError as e:
            # Only a description for the others: the lock itself is held.
            log.warning("cannot say what the agent does in %s: %s", self.lock_dir, e)

    @contextlib.contextmanager
    def hold(self, action: str) -> Iterator[None]:
        """Hold the lock for the block ("applying", "rolling back"); BusyError when the actor
        does not wait long enough. A nested hold by the same object is part of the outer one."""
        if self._fd is not None:
            yield
            return
        try:
            self.lock_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StorageError(f"cannot open the agent's lock {self.path}: {e}") from e
        try:
            self._acquire(fd)
            self._fd = fd
            self._action, self._phase, self._since = action, "", time.time()
            self._write()
            try:
                yield
            finally:
                # The description goes first: once the lock is free it would name the wrong one.
                with contextlib.suppress(OSError):
                    (self.lock_dir / HOLDER_NAME).unlink()
                self._fd = None
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def step(self, phase: str, *, action: str | None = None) -> None:
        """What the holder does now ("writing slot B"); `action` names the whole job anew
        ("applying 2.0.0" once the version is chosen). Nothing when the lock is not held."""
        if self._fd is None:
            return
        if action is not None:
            self._action = action
        self._phase, self._since = phase, time.time()
        self._write()
