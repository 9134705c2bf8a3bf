"""sd_notify(3) without libsystemd: one datagram to the socket systemd names in $NOTIFY_SOCKET.

systemd passes either a path ("/run/systemd/notify") or an abstract socket name ("@/org/...",
where "@" stands for the leading NUL byte of Linux's abstract namespace). Other transports
(vsock) are not used by a system service and are refused. Standard library only.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from updater.errors import UpdateError

SEND_TIMEOUT = 5.0


class NotifyError(UpdateError):
    """The service manager's notification socket is unusable."""


def socket_address(value: str) -> str:
    """The address for socket.connect(): "@name" becomes the abstract "\\0name"."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    raise NotifyError(f"NOTIFY_SOCKET={value!r} is neither a path nor an abstract socket name")


class Notifier:
    """Sends state changes to the service manager; does nothing when not run by one."""

    def __init__(self, address: str | None = None) -> None:
        raw = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self.address = socket_address(raw) if raw else None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, fields: Mapping[str, str]) -> None:
        """One datagram of KEY=value lines (READY=1, STATUS=..., WATCHDOG=1)."""
        if self.address is None:
            return
        for key, value in fields.items():
            if "\n" in value or "=" in key or "\n" in key:
                raise NotifyError(f"sd_notify field {key!r} must be one line")
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                # systemd drains its socket at once; a stuck listener must not stall the daemon.
                s.settimeout(SEND_TIMEOUT)
                s.connect(self.address)
                s.sendall(payload)
        except OSError as e:
            raise NotifyError(f"cannot notify the service manager: {e}") from e
