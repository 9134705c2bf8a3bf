"""Tell Azure's fabric that this VM has booted, so that its deployment can finish.

An Azure VM stays "provisioning" (and the deployment that created it eventually fails with a
timeout) until the guest reports the health state `Ready` to the WireServer, the host's agent
endpoint at 168.63.129.16. WALinuxAgent and CoreOS's Afterburn (`afterburn --check-in`) do that;
on Berth the first-boot provisioner does it, once it has applied a config or found none.

The protocol (WireServer version 2012-11-30, as Afterburn and cloud-init speak it):

1. `GET /machine/?comp=goalstate` answers an XML `GoalState` naming this VM's container, its role
   instance and the goal state's incarnation;
2. `POST /machine/?comp=health` with a `Health` document that reports `Ready` for exactly those.

The goal state may change between the two (the host then answers the report with 410 Gone), so a
410 reads it again. The WireServer may not answer yet this early in the boot, so connection
errors, timeouts and 5xx are retried with backoff; anything else is an error naming the URL.

Runs on the image: standard library and python3-requests (imported lazily).
"""

from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from xml.sax.saxutils import escape

from updater.provision import http
from updater.provision.plan import ProvisionError

log = logging.getLogger(__name__)

WIRESERVER_URL = "http://168.63.129.16"
# The protocol version Afterburn and cloud-init speak; every WireServer supports it.
MS_VERSION = "2012-11-30"
AGENT_NAME = "berth-provision"
SERVICE = "Azure WireServer"

# A goal state is a few KiB; anything much larger is not the WireServer talking.
MAX_GOAL_STATE = 1 << 20


@dataclass(frozen=True)
class GoalState:
    """What a health report must name: it is accepted only for the current goal state."""

    container_id: str
    instance_id: str
    incarnation: str


class _GoalStateGone(Exception):
    """The health report named a goal state that is no longer current (HTTP 410)."""


def parse_goal_state(xml: bytes, source: str) -> GoalState:
    """The container id, first role instance id and incarnation of a WireServer goal state."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise ProvisionError(f"{source}: not valid XML: {e}") from None
    if root.tag != "GoalState":
        raise ProvisionError(f"{source}: expected a GoalState document, got <{root.tag}>")

    def text(path: str) -> str:
        value = (root.findtext(path) or "").strip()
        if not value:
            raise ProvisionError(f"{source}: the goal state has no {path}")
        return value

    # A VM has one role instance; Afterburn and cloud-init report for the first one too.
    return GoalState(
        container_id=text("Container/ContainerId"),
        instance_id=text("Container/RoleInstanceList/RoleInstance/InstanceId"),
        incarnation=text("Incarnation"),
    )


def health_report(goal: GoalState) -> bytes:
    """The `Health` document that reports `Ready` for `goal`, in Afterburn's shape."""
    return f"""\
<?xml version="1.0" encoding="utf-8"?>
<Health xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" \
xmlns:xsd="http://www.w3.org/2001/XMLSchema">
  <GoalStateIncarnation>{escape(goal.incarnation)}</GoalStateIncarnation>
  <Container>
    <ContainerId>{escape(goal.container_id)}</ContainerId>
    <RoleInstanceList>
      <Role>
        <InstanceId>{escape(goal.instance_id)}</InstanceId>
        <Health>
          <State>Ready</State>
        </Health>
      </Role>
    </RoleInstanceList>
  </Container>
</Health>
""".encode()


def report_ready(
    *, base_url: str = WIRESERVER_URL, timeout: float = 10.0, wait: float = 120.0
) -> None:
    """Report this VM `Ready` to the WireServer at `base_url`, trying for up to `wait` seconds.

    `timeout` bounds each request. Raises ProvisionError when the WireServer refuses (a status
    other than 2xx, 5xx or 410), answers a goal state without the ids a report needs, or has not
    accepted the report within `wait` seconds.
    """
    import requests

    base = base_url.rstrip("/")
    goal_url = f"{base}/machine/?comp=goalstate"
    health_url = f"{base}/machine/?comp=health"
    headers = {"x-ms-version": MS_VERSION, "x-ms-agent-name": AGENT_NAME}
    deadline = time.monotonic() + wait
    goal: GoalState | None = None

    def send(method: str, url: str, body: bytes | None = None) -> bytes:
        """One request: a 2xx answer's body, or http.NotYet, _GoalStateGone, ProvisionError."""
        remaining = max(deadline - time.monotonic(), 0.1)
        extra = {"Content-Type": "text/xml; charset=utf-8"} if body is not None else {}
        with (
            http.request_errors(f"{method} {url}", SERVICE),
            session.request(
                method,
                url,
                headers=headers | extra,
                data=body,
                # Capped by what is left of `wait`, so that a silent server cannot hold the
                # boot much longer than promised.
                timeout=(min(http.CONNECT_TIMEOUT, remaining), min(timeout, remaining)),
                allow_redirects=False,
                stream=True,
            ) as response,
        ):
            status = response.status_code
            answer = f"{method} {url} answered HTTP {status} {response.reason or ''}".rstrip()
            if 200 <= status < 300:
                body = http.read_capped(response, MAX_GOAL_STATE)
                if body is None:
                    raise ProvisionError(
                        f"{SERVICE}: {url}: answer larger than {MAX_GOAL_STATE >> 10} KiB"
                    )
                return body
            if status == 410:
                raise _GoalStateGone(answer)
            if status >= 500:
                raise http.NotYet(answer)
            raise ProvisionError(f"{SERVICE}: {answer}")

    def report() -> None:
        nonlocal goal
        try:
            if goal is None:
                goal = parse_goal_state(send("GET", goal_url), f"{SERVICE} {goal_url}")
            send("POST", health_url, health_report(goal))
        except _GoalStateGone as e:
            # The host moved to a new goal state; a report for the old one is refused.
            goal = None
            raise http.NotYet(f"{e} (the goal state changed; reading it again)") from None
        log.info(
            "reported Ready to %s (incarnation %s, instance %s)",
            base,
            goal.incarnation,
            goal.instance_id,
        )

    def give_up(last: str, attempts: int) -> ProvisionError:
        return ProvisionError(
            f"{SERVICE} at {base} did not accept the Ready report within {wait:g} s: {last}"
        )

    with requests.Session() as session:
        # A proxy from the environment must never see (or answer for) the WireServer.
        session.trust_env = False
        http.retry_until(
            deadline, report, give_up, on_retry=lambda last: log.info("%s; trying again", last)
        )
