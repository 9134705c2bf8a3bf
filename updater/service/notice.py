"""Warning logged-in users before the agent reboots the machine.

Someone with a shell open gets a wall(1) message and `reboot_delay` (10 minutes by default) to
finish; a machine nobody is logged into reboots at once, since waiting would only hold the reboot
slot longer. Sessions are counted with `loginctl list-sessions --json=short` (systemd-logind is
in the image, and so is wall from util-linux). If logind cannot be asked, the agent warns and
waits anyway: an unknown audience is treated as present.

A failing wall is logged and does not stop the reboot: the update was scheduled by the operator's
strategy, and a broadcast is a courtesy.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from updater import run
from updater.errors import CommandError

log = logging.getLogger(__name__)

WALL = ("wall",)
LIST_SESSIONS = ("loginctl", "list-sessions", "--json=short")
TIMEOUT = 10.0


def parse_sessions(text: str) -> int:
    """Interactive sessions in loginctl's JSON: user sessions and anything on a terminal."""
    doc = json.loads(text)
    if not isinstance(doc, list):
        raise ValueError("expected a JSON list of sessions")
    return sum(
        1
        for s in doc
        if isinstance(s, dict) and (str(s.get("class", "")).startswith("user") or s.get("tty"))
    )


def count_sessions(command: Sequence[str] = LIST_SESSIONS) -> int | None:
    """Logged-in sessions, or None when logind cannot be asked."""
    try:
        result = run.run(command, timeout=TIMEOUT)
        return parse_sessions(result.stdout.decode())
    except (CommandError, ValueError) as e:
        log.warning("cannot count logged-in users (%s); warning anyway", e)
        return None


def warn_users(message: str, command: Sequence[str] = WALL) -> None:
    """Broadcast `message` to every terminal; failures are logged only."""
    try:
        run.run(command, input=(message + "\n").encode(), timeout=TIMEOUT)
    except CommandError as e:
        log.warning("cannot warn logged-in users with %s: %s", " ".join(command), e)


def reboot_message(version: str, seconds: float) -> str:
    minutes = max(round(seconds / 60), 1)
    return (
        f"Berth will reboot this machine in {minutes} minute(s) to start version {version}. "
        "Save your work. (berth-update.service; strategy and reboot_delay in "
        "/etc/berth/update.toml)"
    )
