"""Run one piece of update work in a forked child process and bring its result back.

Why: the daemon idles for an hour between checks, and the work it does once an hour pulls in
requests, urllib3, python-tuf and cryptography (plus whatever the TLS and TUF code allocates).
Done in the daemon's own process, that memory stays resident for good (CPython rarely returns it).
Done in a child, the resident daemon holds only its loop, its configuration and its state
machine (see machine.py, config.py: neither imports the heavy modules; what the agent's state
file says comes back from a child too), and a leak or a crash in the heavy code ends with the
child.

The child inherits everything (the machine, the configuration, logging to the journal, the
$NOTIFY_SOCKET; the unit sets NotifyAccess=all) and sends back one pickled message on a pipe:
its result, an error the daemon survives (its message), or a bug (its traceback).
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

from updater.errors import UpdateError

T = TypeVar("T")


class WorkerBug(RuntimeError):
    """The child hit a programming error: the daemon must not carry on as if it were transient."""


def _recoverable(error: BaseException) -> bool:
    """Errors a later attempt may get past: update refusals, I/O, the network."""
    if isinstance(error, UpdateError | OSError):
        return True
    requests = sys.modules.get("requests")  # only the child that used it has it loaded
    return requests is not None and isinstance(error, requests.RequestException)


def _child(work: Callable[[], T], write_fd: int) -> None:
    try:
        message: tuple[str, object] = ("ok", work())
    except BaseException as e:
        if _recoverable(e):
            message = ("error", str(e))
        else:
            message = ("bug", "".join(traceback.format_exception(e)))
    try:
        data = pickle.dumps(message)
    except Exception as e:  # an unpicklable result is a bug in the caller
        data = pickle.dumps(("bug", f"cannot send the result back: {e}"))
    with os.fdopen(write_fd, "wb") as pipe:
        pipe.write(data)


def run_in_child(work: Callable[[], T]) -> T:
    """`work()` in a forked child: its return value, or UpdateError / WorkerBug from its failure."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never return into the caller's stack
        status = 0
        try:
            os.close(read_fd)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _child(work, write_fd)
        except BaseException:
            status = 70
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    _, wait_status = os.waitpid(pid, 0)
    if not data:
        if os.WIFSIGNALED(wait_status):
            how = f"was killed by signal {signal.Signals(os.WTERMSIG(wait_status)).name}"
        else:
            how = f"exited with status {os.waitstatus_to_exitcode(wait_status)}"
        raise UpdateError(f"the update worker (pid {pid}) {how} before reporting a result")
    kind, value = pickle.loads(data)
    if kind == "ok":
        return value  # type: ignore[no-any-return]
    if kind == "error":
        raise UpdateError(str(value))
    raise WorkerBug(f"the update worker failed:\n{value}")
