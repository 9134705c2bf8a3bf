"""berth-lockd under bad clients, over real sockets: slow and idle connections are cut off, the
number served at once is bounded, bodies and ids are bounded, and the log escapes what was sent."""

from __future__ import annotations

import json
import logging
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from updater.reboot.fleetlock import FleetLockClient
from updater.reboot.lockd import MAX_BODY, LockServer, escape
from updater.reboot.semaphore import LockError, MemoryStore, SemaphoreClient

HEADER = {"fleet-lock-protocol": "true"}


@pytest.fixture
def server() -> Iterator[LockServer]:
    running = LockServer(
        ("127.0.0.1", 0), MemoryStore(), 2, idle_timeout=1.0, read_timeout=1.0
    ).start()
    yield running
    running.stop()


def connect(server: LockServer) -> socket.socket:
    host, port = server.server_address[:2]
    return socket.create_connection((str(host), port), timeout=10)


def request(doc: object, path: str = "/v1/pre-reboot", extra: str = "") -> bytes:
    body = json.dumps(doc).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: lockd\r\nfleet-lock-protocol: true\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


def body(holder: str, group: str = "default") -> dict[str, object]:
    return {"client_params": {"id": holder, "group": group}}


def closed_within(connection: socket.socket, seconds: float) -> bool:
    """Whether the server closes `connection` within `seconds` (what it sent before is dropped)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([connection], [], [], left)
        if readable:
            try:
                if not connection.recv(65536):
                    return True
            except ConnectionResetError:
                return True
    return False


def answer(connection: socket.socket, seconds: float = 5.0) -> bytes | None:
    """The first whole answer on `connection`, or None if none starts within `seconds`."""
    readable, _, _ = select.select([connection], [], [], seconds)
    if not readable:
        return None
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = connection.recv(65536)
        if not chunk:
            return reply
        reply += chunk
    head, _, rest = reply.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    while len(rest) < length and (chunk := connection.recv(65536)):
        rest += chunk
    return head + b"\r\n\r\n" + rest


def test_a_client_trickling_its_request_is_cut_off(server: LockServer) -> None:
    connection = connect(server)
    data = request(body("slow"))
    start = time.monotonic()
    cut = False
    for byte in data:
        try:
            connection.send(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            cut = True
            break
        if closed_within(connection, 0.2):  # one byte every 0.2 s: each read would succeed
            cut = True
            break
    elapsed = time.monotonic() - start
    assert cut, "the server waited for the whole trickled request"
    assert 0.9 < elapsed < 2.5, elapsed
    # Nothing was taken: the request never completed.
    assert SemaphoreClient(server.store, "default").show()[0].holders == ()


def test_an_idle_connection_is_closed_and_a_quick_one_kept_alive(server: LockServer) -> None:
    idle = connect(server)
    start = time.monotonic()
    assert closed_within(idle, 3.0)
    assert 0.9 < time.monotonic() - start < 2.5
    # Keep-alive works within the idle timeout, and the timeout applies between requests too.
    kept = connect(server)
    for holder in ("a", "a"):
        kept.sendall(request(body(holder)))
        reply = answer(kept)
        assert reply is not None and reply.startswith(b"HTTP/1.1 200 ")
        time.sleep(0.5)
    assert closed_within(kept, 3.0)


def test_connections_beyond_the_bound_wait_without_a_thread() -> None:
    bound = 3
    server = LockServer(
        ("127.0.0.1", 0), MemoryStore(), 1, idle_timeout=30.0, max_connections=bound
    ).start()
    try:
        threads_before = threading.active_count()
        held = [connect(server) for _ in range(bound)]
        deadline = time.monotonic() + 5
        while threading.active_count() < threads_before + bound:
            assert time.monotonic() < deadline, "the held connections got no handler"
            time.sleep(0.01)
        waiting = connect(server)
        waiting.sendall(request(body("m")))
        assert answer(waiting, 0.5) is None  # queued, not served
        more = [connect(server) for _ in range(20)]
        time.sleep(0.3)
        assert threading.active_count() == threads_before + bound
        held.pop().close()  # a slot frees: the first in the queue is served
        reply = answer(waiting)
        assert reply is not None and reply.startswith(b"HTTP/1.1 200 "), reply
        for connection in held + more + [waiting]:
            connection.close()
    finally:
        start = time.monotonic()
        server.stop()  # even with connections queued behind the bound
        assert time.monotonic() - start < 3


def test_bodies_are_bounded_and_framed(server: LockServer) -> None:
    cases = [
        (f"Content-Length: {MAX_BODY + 1}\r\n", b"", b"HTTP/1.1 413 "),
        ("Transfer-Encoding: chunked\r\n", b"0\r\n\r\n", b"HTTP/1.1 411 "),
        ("Content-Length: -5\r\n", b"", b"HTTP/1.1 400 "),
        ("Content-Length: 1e3\r\n", b"", b"HTTP/1.1 400 "),
    ]
    for header, payload, status in cases:
        connection = connect(server)
        head = f"POST /v1/pre-reboot HTTP/1.1\r\nfleet-lock-protocol: true\r\n{header}\r\n"
        connection.sendall(head.encode() + payload)
        reply = answer(connection)
        assert reply is not None and reply.startswith(status), (header, reply)
        assert b'"kind": "bad_body"' in reply
        if status != b"HTTP/1.1 400 ":
            assert b"Connection: close" in reply and closed_within(connection, 1.0)
        connection.close()
    # A body shorter than its Content-Length is waited for only until the read timeout.
    short = connect(server)
    short.sendall(request(body("m"))[:-5])
    assert closed_within(short, 3.0)


@pytest.mark.parametrize(
    ("holder", "expected"),
    [
        ("m\nINFO default: evil took a slot", "printable characters only"),
        ("m\x00", "printable characters only"),
        ("m\x1b[2J", "printable characters only"),
        ("admin\u202e", "printable characters only"),  # a bidi override hides what follows
        ("é" * 127, "at most 253 bytes (UTF-8), not 254"),
        ("x" * 1000, "at most 253 bytes (UTF-8), not 1000"),
    ],
)
def test_bad_ids_are_refused_with_400_and_a_message(
    server: LockServer, holder: str, expected: str
) -> None:
    response = requests.post(server.url + "v1/pre-reboot", json=body(holder), headers=HEADER)
    assert response.status_code == 400
    assert response.json()["kind"] == "bad_id"
    assert f"field 'client_params.id': expected {expected}" in response.json()["value"]
    assert SemaphoreClient(server.store, "default").show()[0].holders == ()


def test_the_longest_id_and_group_are_accepted(server: LockServer) -> None:
    longest = "é" * 126 + "x"  # 253 bytes
    group = "g" * 253
    response = requests.post(
        server.url + "v1/pre-reboot", json=body(longest, group), headers=HEADER
    )
    assert response.status_code == 200, response.text
    too_long = requests.post(
        server.url + "v1/pre-reboot", json=body("m", group + "g"), headers=HEADER
    )
    assert (too_long.status_code, too_long.json()["kind"]) == (400, "bad_group")
    assert "at most 253 bytes" in too_long.json()["value"]


def test_every_writer_of_the_semaphore_keeps_the_same_id_rules() -> None:
    with pytest.raises(LockError, match="expected printable characters only"):
        SemaphoreClient(MemoryStore(), "default").acquire("m\n")
    with pytest.raises(LockError, match="expected at most 253 bytes") as info:
        FleetLockClient("http://lockd.invalid/", "default", "x" * 10_000)
    assert str(info.value) == (
        f"FleetLock id {'x' * 64!r}...: expected at most 253 bytes (UTF-8), not 10000"
    )
    with pytest.raises(LockError, match="expected a non-empty string"):
        FleetLockClient("http://lockd.invalid/", "default", "")


def test_log_lines_escape_what_the_client_sent(
    server: LockServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="berth-lockd")
    # A request line with a terminal escape and a carriage return (which http.server takes for a
    # word break: a 400), a path with a DEL, and an id with a newline.
    for start in (b"POST /v1/pre-reboot\x1b[2J\rINFO forged HTTP/1.1", b"POST /v1/\x7f HTTP/1.1"):
        connection = connect(server)
        connection.sendall(start + b"\r\nfleet-lock-protocol: true\r\nContent-Length: 0\r\n\r\n")
        assert answer(connection) is not None
        connection.close()
    requests.post(server.url + "v1/pre-reboot", json=body("m\nINFO forged"), headers=HEADER)
    assert requests.post(server.url + "v1/pre-reboot", json=body("ok"), headers=HEADER).ok
    lines = [record.getMessage() for record in caplog.records if record.name == "berth-lockd"]
    assert '"POST /v1/pre-reboot\\x1b[2J\\rINFO forged HTTP/1.1" 400' in "\n".join(lines)
    assert "refused /v1/\\x7f: no endpoint /v1/\\x7f" in "\n".join(lines)
    assert "got 'm\\nINFO forged'" in "\n".join(lines)
    assert any(line.endswith("default: ok took a slot (1/2)") for line in lines), lines
    assert all(line.isprintable() for line in lines), lines
    assert escape("a\u2028b\x85c") == "a\\u2028b\\x85c"  # line breaks outside ASCII too
