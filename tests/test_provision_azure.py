"""The Azure Ready report, against a WireServer stand-in on 127.0.0.1.

The stand-in (tests/support/misbehaving_server.py) behaves like the host's agent endpoint where
it matters: it serves goal states in turn, and accepts a health report only when it names the
current container, instance and incarnation (a stale incarnation is 410 Gone, as on Azure).
Tests script failures into it.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import pytest

from tests.support.misbehaving_server import (
    CONTAINER,
    INSTANCE,
    Misbehaviour,
    Seen,
    WireServer,
    goal_state_xml,
    refusing_port,
    silent_port,
)
from updater.provision.azure import (
    AGENT_NAME,
    MS_VERSION,
    GoalState,
    health_report,
    parse_goal_state,
    report_ready,
)
from updater.provision.plan import ProvisionError


@pytest.fixture
def wire() -> Iterator[WireServer]:
    with WireServer() as server:
        yield server


def reported(seen: Seen) -> dict[str, str | None]:
    """The values a health report carries, read back as the fabric would."""
    root = ET.fromstring(seen.body)
    assert root.tag == "Health"
    return {
        "incarnation": root.findtext("GoalStateIncarnation"),
        "container": root.findtext("Container/ContainerId"),
        "instance": root.findtext("Container/RoleInstanceList/Role/InstanceId"),
        "state": root.findtext("Container/RoleInstanceList/Role/Health/State"),
    }


def test_reports_ready_for_the_current_goal_state(wire: WireServer) -> None:
    report_ready(base_url=wire.url, wait=10)

    get, post = wire.requests()
    assert (get.method, get.path, get.status) == ("GET", "/machine/?comp=goalstate", 200)
    assert (post.method, post.path, post.status) == ("POST", "/machine/?comp=health", 200)
    for seen in (get, post):
        assert seen.headers["x-ms-version"] == "2012-11-30"
        assert seen.headers["x-ms-agent-name"] == AGENT_NAME
    assert post.headers["content-type"] == "text/xml; charset=utf-8"
    assert post.body.startswith(b'<?xml version="1.0" encoding="utf-8"?>\n<Health ')
    assert reported(post) == {
        "incarnation": "3",
        "container": CONTAINER,
        "instance": INSTANCE,
        "state": "Ready",
    }


def test_health_report_has_afterburns_shape() -> None:
    root = ET.fromstring(health_report(GoalState("c", "i", "7")))
    assert [child.tag for child in root] == ["GoalStateIncarnation", "Container"]
    container = root.find("Container")
    assert container is not None
    assert [child.tag for child in container] == ["ContainerId", "RoleInstanceList"]
    roles = container.findall("RoleInstanceList/Role")
    assert len(roles) == 1
    assert [child.tag for child in roles[0]] == ["InstanceId", "Health"]
    assert roles[0].findtext("Health/State") == "Ready"


def test_ids_that_need_escaping_arrive_intact(wire: WireServer) -> None:
    wire.goal_states = [goal_state_xml("12", "c<&>d", 'vm"1&2')]
    report_ready(base_url=wire.url + "/", wait=10)
    (post,) = wire.requests("POST")
    assert post.status == 200
    assert reported(post) == {
        "incarnation": "12",
        "container": "c<&>d",
        "instance": 'vm"1&2',
        "state": "Ready",
    }


def test_first_role_instance_is_reported() -> None:
    xml = goal_state_xml().replace(
        b"</RoleInstanceList>",
        b"<RoleInstance><InstanceId>second</InstanceId></RoleInstance></RoleInstanceList>",
    )
    assert parse_goal_state(xml, "test") == GoalState(CONTAINER, INSTANCE, "3")


def test_goal_state_unavailable_twice_then_answers(wire: WireServer) -> None:
    wire.fail("comp=goalstate", 503, 503)
    report_ready(base_url=wire.url, wait=10)
    assert [(s.method, s.status) for s in wire.requests()] == [
        ("GET", 503),
        ("GET", 503),
        ("GET", 200),
        ("POST", 200),
    ]


def test_server_error_on_the_report_retries_the_report(wire: WireServer) -> None:
    wire.fail("comp=health", 500, 502)
    report_ready(base_url=wire.url, wait=10)
    assert [(s.method, s.status) for s in wire.requests()] == [
        ("GET", 200),
        ("POST", 500),
        ("POST", 502),
        ("POST", 200),
    ]
    assert reported(wire.requests("POST")[-1])["incarnation"] == "3"


def test_gone_rereads_the_goal_state_and_reports_the_new_incarnation(wire: WireServer) -> None:
    # The host moves to incarnation 4 right after incarnation 3 was read.
    wire.goal_states = [goal_state_xml("3"), goal_state_xml("4")]
    report_ready(base_url=wire.url, wait=10)
    assert [(s.method, s.status) for s in wire.requests()] == [
        ("GET", 200),
        ("POST", 410),
        ("GET", 200),
        ("POST", 200),
    ]
    first, last = wire.requests("POST")
    assert reported(first)["incarnation"] == "3"
    assert reported(last) == {
        "incarnation": "4",
        "container": CONTAINER,
        "instance": INSTANCE,
        "state": "Ready",
    }


@pytest.mark.parametrize(
    ("goal_failures", "health_failures", "method", "path", "status"),
    [
        ([403], [], "GET", "goalstate", "HTTP 403 Forbidden"),
        ([404], [], "GET", "goalstate", "HTTP 404 Not Found"),
        ([302], [], "GET", "goalstate", "HTTP 302 Found"),
        ([], [400], "POST", "health", "HTTP 400 Bad Request"),
        ([], [401], "POST", "health", "HTTP 401 Unauthorized"),
    ],
)
def test_refusals_are_errors_naming_url_and_status_at_once(
    wire: WireServer,
    goal_failures: list[int],
    health_failures: list[int],
    method: str,
    path: str,
    status: str,
) -> None:
    wire.fail("comp=goalstate", *goal_failures)
    wire.fail("comp=health", *health_failures)
    started = time.monotonic()
    with pytest.raises(ProvisionError) as error:
        report_ready(base_url=wire.url, wait=30)
    assert time.monotonic() - started < 5  # not retried
    assert str(error.value) == (
        f"Azure WireServer: {method} {wire.url}/machine/?comp={path} answered {status}"
    )
    assert len(wire.requests(method)) == 1


def test_silent_server_gives_up_within_the_wait() -> None:
    with silent_port() as port:
        url = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        with pytest.raises(ProvisionError) as error:
            report_ready(base_url=url, timeout=30, wait=1.0)
        elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 3.0
    message = str(error.value)
    assert message.startswith(
        f"Azure WireServer at {url} did not accept the Ready report within 1 s: "
        f"GET {url}/machine/?comp=goalstate: "
    )
    assert "timed out" in message


def test_refused_connections_are_retried_until_the_wait_ends() -> None:
    with refusing_port() as port:
        url = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        with pytest.raises(ProvisionError, match=r"did not accept the Ready report within 0\.8 s"):
            report_ready(base_url=url, wait=0.8)
        assert 0.8 <= time.monotonic() - started < 3.0


def test_a_server_that_stays_unavailable_is_named_with_its_last_answer(wire: WireServer) -> None:
    wire.rules.append(Misbehaviour("comp=goalstate", status=503))
    with pytest.raises(ProvisionError) as error:
        report_ready(base_url=wire.url, wait=0.8)
    assert str(error.value) == (
        f"Azure WireServer at {wire.url} did not accept the Ready report within 0.8 s: "
        f"GET {wire.url}/machine/?comp=goalstate answered HTTP 503 Service Unavailable"
    )
    assert len(wire.requests("GET")) >= 2
    assert wire.requests("POST") == []


def test_a_goal_state_that_keeps_changing_gives_up(wire: WireServer) -> None:
    wire.rules.append(Misbehaviour("comp=health", status=410))
    with pytest.raises(ProvisionError, match="HTTP 410 Gone \\(the goal state changed"):
        report_ready(base_url=wire.url, wait=0.8)
    # Every 410 was followed by a fresh goal state.
    methods = [s.method for s in wire.requests()]
    assert methods[:4] == ["GET", "POST", "GET", "POST"]


def _without(tag: str) -> bytes:
    xml = goal_state_xml()
    start, end = xml.index(f"<{tag}>".encode()), xml.index(f"</{tag}>".encode())
    return xml[:start] + xml[end + len(tag) + 3 :]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"<GoalState><Incarnation>1</Incarnation>", "not valid XML: no element found"),
        (b"", "not valid XML"),
        (b"<Versions><Supported/></Versions>", "expected a GoalState document, got <Versions>"),
        (_without("ContainerId"), "the goal state has no Container/ContainerId"),
        (_without("InstanceId"), "the goal state has no Container/RoleInstanceList/RoleInstance/"),
        (_without("RoleInstanceList"), "no Container/RoleInstanceList/RoleInstance/InstanceId"),
        (_without("Incarnation"), "the goal state has no Incarnation"),
        (
            goal_state_xml().replace(CONTAINER.encode(), b"  "),
            "the goal state has no Container/ContainerId",
        ),
    ],
)
def test_malformed_goal_state_is_an_error_naming_what_is_missing(
    wire: WireServer, body: bytes, problem: str
) -> None:
    wire.goal_states = [body]
    with pytest.raises(ProvisionError) as error:
        report_ready(base_url=wire.url, wait=30)
    assert str(error.value).startswith(f"Azure WireServer {wire.url}/machine/?comp=goalstate: ")
    assert problem in str(error.value)
    assert wire.requests("POST") == []


def test_oversized_goal_state_is_refused(wire: WireServer) -> None:
    wire.goal_states = [goal_state_xml().replace(b"<Machine>", b"<Machine>" + b" " * (2 << 20))]
    with pytest.raises(ProvisionError, match="answer larger than 1024 KiB"):
        report_ready(base_url=wire.url, wait=30)


def test_a_proxy_from_the_environment_is_not_used(
    wire: WireServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with refusing_port() as port:
        dead = f"http://127.0.0.1:{port}"
        for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
            monkeypatch.setenv(name, dead)
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        report_ready(base_url=wire.url, wait=2)
    assert [s.status for s in wire.requests()] == [200, 200]


def test_defaults_name_the_wireserver() -> None:
    import inspect

    defaults = {name: p.default for name, p in inspect.signature(report_ready).parameters.items()}
    assert defaults == {"base_url": "http://168.63.129.16", "timeout": 10.0, "wait": 120.0}
    assert MS_VERSION == "2012-11-30"
