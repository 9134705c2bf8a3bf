"""The one way the update agent, its daemon, the health check and the provisioner run a command.

Every external program on the device (bootctl, veritysetup, systemctl, loginctl, wall, blkid,
mount, an operator's health hook, a `runcmd` entry) is started by `run`, which

- takes an argument list, never a shell string (a caller that wants a shell says `/bin/sh -c`);
- always has a timeout: a hung bootctl must not block the daemon for good. On expiry the whole
  process group is killed (each command starts in a session of its own), so a hook's `sleep &`
  dies with it;
- gives the command a clean environment: `PATH`, `LANG=C.UTF-8` and only what the caller passes.
  The daemon's own environment (NOTIFY_SOCKET with NotifyAccess=all, the unit's variables) is
  nobody else's business, and tools parse the same way whatever locale the machine has;
- reads stdin from /dev/null unless input is given, and captures the output;
- raises errors.CommandError (non-zero exit, with the tail of stderr in the message),
  CommandTimeout or ToolMissing (naming the tool and where it was looked for).

Standard library only, and cheap to import: the resident daemon imports this (see worker.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from updater.errors import CommandError, CommandTimeout, ToolMissing

log = logging.getLogger(__name__)

# Where programs are looked up, and the PATH a command sees. Fixed rather than inherited: every
# tool of the image is here (/usr/local, on the read-only /usr, holds nothing), and whoever
# started the agent must not decide which program a name runs.
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
LANG = "C.UTF-8"
# How long a killed command's pipes are drained, and its exit awaited, before giving up on them:
# a grandchild outside the process group may hold a pipe open, and a process in uninterruptible
# I/O (a dying disk) cannot die until the I/O ends.
KILL_GRACE = 5.0
# Lines and characters of error output that an error message carries.
TAIL_LINES = 10
TAIL_CHARS = 2000


class Output(StrEnum):
    CAPTURE = "capture"  # stdout and stderr captured apart
    COMBINED = "combined"  # stderr into stdout, in the order written (a hook's log)
    INHERIT = "inherit"  # both go where ours go (the service's journal and console)


@dataclass(frozen=True)
class Completed:
    """A command that ran to its end; with `check` (the default) only a successful one."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes


def find_tool(name: str, path: str | None = None) -> str:
    """The program `name` would run: a path as given, else the first executable in `path`
    (by default PATH, read at each call so that tests can put stand-ins first)."""
    path = PATH if path is None else path
    if "/" in name:
        if not os.path.exists(name):
            raise ToolMissing(f"{name} not found", argv=(name,))
        if os.path.isdir(name) or not os.access(name, os.X_OK):
            raise ToolMissing(f"{name} is not an executable file", argv=(name,))
        return name
    found = shutil.which(name, path=path)
    if found is None:
        raise ToolMissing(f"{name} not found in {path}", argv=(name,))
    return found


def tail(data: bytes) -> str:
    """The last lines of a command's output, as text fit for a one-line error message."""
    lines = data.decode(errors="replace").strip().splitlines()[-TAIL_LINES:]
    text = "\n".join(lines)
    return text if len(text) <= TAIL_CHARS else "…" + text[-TAIL_CHARS:]


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    output: Output = Output.CAPTURE,
    check: bool = True,
) -> Completed:
    """Run `argv` for at most `timeout` seconds; its result, or a CommandError subclass.

    `env` adds to (or overrides) PATH and LANG. With `check`, a non-zero exit raises
    CommandError; without it the caller reads `returncode`. A timeout, a missing program or one
    that cannot be started always raises.
    """
    args = tuple(os.fspath(a) for a in argv)
    command = shlex.join(args)
    full_env = {"PATH": PATH, "LANG": LANG, **(env or {})}
    executable = find_tool(args[0], full_env["PATH"])
    pipe = None if output is Output.INHERIT else subprocess.PIPE
    log.debug("+ %s", command)
    try:
        process = subprocess.Popen(
            args,
            executable=executable,
            stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
            stdout=pipe,
            stderr=subprocess.STDOUT if output is Output.COMBINED else pipe,
            env=full_env,
            # Its own process group, so that a timeout kills everything it started.
            start_new_session=True,
        )
    except OSError as e:
        raise CommandError(f"{command} could not be started: {e.strerror}", argv=args) from e
    try:
        stdout, stderr = process.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr = _kill(process)
        written = tail(stdout + stderr)
        raise CommandTimeout(
            f"{command} did not finish within {timeout:g} s" + (f": {written}" if written else ""),
            argv=args,
            timeout=timeout,
            stdout=stdout,
            stderr=stderr,
        ) from None
    except BaseException:  # interrupted (KeyboardInterrupt, a signal handler): leave nothing behind
        _kill(process)
        raise
    result = Completed(args, process.returncode, stdout or b"", stderr or b"")
    if check and result.returncode != 0:
        written = tail(result.stderr or result.stdout)
        if result.returncode < 0:
            how = f"was killed by signal {signal.Signals(-result.returncode).name}"
        else:
            how = f"failed with exit status {result.returncode}"
        raise CommandError(
            f"{command} {how}" + (f": {written}" if written else ""),
            argv=args,
            status=result.returncode,
            stdout=result.stdout,
            stderr=result.stderr,
        )
    return result


def _kill(process: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    """Kill `process` and its group; what it wrote, as far as that can be had without hanging."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    try:
        stdout, stderr = process.communicate(timeout=KILL_GRACE)
        return stdout or b"", stderr or b""
    except subprocess.TimeoutExpired as e:
        # Someone outside the group holds a pipe open, or the child is stuck in the kernel: keep
        # what was read and stop waiting (subprocess reaps the child when it finally exits).
        for stream in (process.stdout, process.stderr, process.stdin):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=KILL_GRACE)
        return e.stdout or b"", e.stderr or b""
