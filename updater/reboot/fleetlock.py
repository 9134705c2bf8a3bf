"""A FleetLock client: the HTTP protocol Zincati speaks to airlock and its kin.

    POST {base}/v1/pre-reboot     take a reboot slot (before rebooting)
    POST {base}/v1/steady-state   give it back (once the new version is blessed, and at start)
    header  fleet-lock-protocol: true
    body    {"client_params": {"id": "<holder id>", "group": "<group>"}}

200 means done; every other status means not done, and the body may say why as
{"kind": ..., "value": ...}. Locking is recursive on the server: asking again for a slot this
machine already holds is granted, and releasing one it does not hold succeeds.

Connection errors and 5xx answers are retried a few times with a doubling backoff inside one
call; what is left (the slot is taken, or the server is down) goes back to the daemon, which
asks again later. A non-200 answer to pre-reboot is "not now" (airlock answers a full semaphore
with 500); to steady-state it is an error, since a slot that cannot be given back blocks others.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import requests

from updater.reboot.semaphore import GROUP_NAME, LockError, check_holder

PRE_REBOOT = "v1/pre-reboot"
STEADY_STATE = "v1/steady-state"
HEADER = {"fleet-lock-protocol": "true"}
TIMEOUT = (5.0, 15.0)


@dataclass(frozen=True)
class Answer:
    ok: bool
    status: int
    kind: str  # the server's error kind ("" on success)
    message: str


class FleetLockClient:
    def __init__(
        self,
        base_url: str,
        group: str,
        holder: str,
        *,
        session: requests.Session | None = None,
        attempts: int = 3,
        backoff: float = 1.0,
        timeout: tuple[float, float] = TIMEOUT,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not GROUP_NAME.fullmatch(group):
            raise LockError(f"FleetLock group {group!r}: expected letters, digits, '.' or '-'")
        # The server would refuse it on every request: better said once, here.
        check_holder(holder, "FleetLock id")
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.group = group
        self.holder = holder
        self.session = session or requests.Session()
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout
        self._sleep = sleep

    def _body(self) -> dict[str, dict[str, str]]:
        return {"client_params": {"id": self.holder, "group": self.group}}

    def _post(self, endpoint: str) -> Answer:
        url = self.base_url + endpoint
        delay = self.backoff
        last = ""
        for attempt in range(self.attempts):
            if attempt:
                self._sleep(delay)
                delay *= 2
            try:
                response = self.session.post(
                    url, json=self._body(), headers=HEADER, timeout=self.timeout
                )
            except requests.RequestException as e:
                last = f"{url}: {e}"
                continue
            answer = _answer(response)
            if answer.ok or response.status_code < 500 or attempt == self.attempts - 1:
                return answer
            last = f"{url}: HTTP {response.status_code}: {answer.message}"
        raise LockError(f"FleetLock server unreachable after {self.attempts} attempts: {last}")

    def pre_reboot(self) -> Answer:
        """Ask for a reboot slot. `ok`: granted (or already held); otherwise `message` says why."""
        return self._post(PRE_REBOOT)

    def steady_state(self) -> None:
        """Give back any slot this machine holds; raises LockError when the server refuses."""
        answer = self._post(STEADY_STATE)
        if not answer.ok:
            raise LockError(
                f"FleetLock {self.base_url}{STEADY_STATE} refused to release {self.holder}: "
                f"HTTP {answer.status}: {answer.message}"
            )


def _answer(response: requests.Response) -> Answer:
    if response.status_code == 200:
        return Answer(True, 200, "", "")
    kind, message = "", response.text.strip()[:300]
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        kind = str(doc.get("kind", ""))
        message = str(doc.get("value", message))
    return Answer(False, response.status_code, kind, message or response.reason or "")
