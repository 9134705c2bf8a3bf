"""Operator hooks: every executable file in a directory, run in sorted name order.

Two directories use them: /etc/berth/health.d/ (the boot health check, service/health.py) and
/etc/berth/pre-reboot.d/ (the daemon, right before it reboots into an update: a drain). Each hook
runs through updater.run: an argument list of one (the file itself, so it needs a `#!` line), a
timeout after which its whole process group is killed, stdin from /dev/null, a clean environment
(PATH, LANG and what the caller adds), stderr into stdout so that its output tail reads in the
order it was written. A file that is not executable, or not a file, is skipped and logged: an
operator disables a hook with `chmod -x`.

Standard library only, and cheap to import: the resident daemon runs pre-reboot hooks itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from updater import run
from updater.errors import CommandError, CommandTimeout

log = logging.getLogger(__name__)

OUTPUT_TAIL = 2000


@dataclass(frozen=True)
class Result:
    """One check or hook: its name ("hook 50-drain"), whether it passed, and what it said."""

    name: str
    ok: bool
    detail: str


def tail(text: str) -> str:
    """The last OUTPUT_TAIL characters of a hook's output, stripped."""
    text = text.strip()
    return text if len(text) <= OUTPUT_TAIL else "…" + text[-OUTPUT_TAIL:]


def run_hook(hook: Path, *, timeout: float, env: Mapping[str, str] | None = None) -> Result:
    """Run one hook; a non-zero exit, a timeout or a hook that cannot start is a failed Result."""
    name = f"hook {hook.name}"
    try:
        done = run.run(
            [str(hook)], timeout=timeout, env=env, output=run.Output.COMBINED, check=False
        )
    except CommandTimeout as e:
        output = e.stdout.decode(errors="replace")
        return Result(name, False, f"timed out after {timeout:.0f} s: {tail(output)}")
    except CommandError as e:
        return Result(name, False, f"cannot run: {e}")
    output = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        return Result(name, False, f"exit status {done.returncode}: {tail(output)}")
    return Result(name, True, tail(output) or "ok")


def run_hooks(
    directory: Path,
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    stop_at_failure: bool = False,
) -> list[Result]:
    """Run the executable files of `directory` in sorted order, each for at most `timeout` s.

    A missing directory has no hooks. With `stop_at_failure` the first failure ends the run (the
    hooks after it are not started): a pre-reboot hook that follows a failed drain must not act
    as if the reboot were coming.
    """
    try:
        candidates = sorted(directory.iterdir())
    except FileNotFoundError:
        return []
    except OSError as e:
        return [Result("hooks", False, f"cannot list {directory}: {e}")]
    results = []
    for hook in candidates:
        if not hook.is_file() or not os.access(hook, os.X_OK):
            log.info("skipping %s: not an executable file", hook)
            continue
        result = run_hook(hook, timeout=timeout, env=env)
        results.append(result)
        if stop_at_failure and not result.ok:
            break
    return results
