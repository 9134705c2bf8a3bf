"""Fuzzing berth-lockd over a real socket on loopback: whatever bytes a client sends, the answer
is a well-formed HTTP response (2xx or 4xx; 501 for a method other than POST, 505 for an HTTP
version other than 1.x, the protocol's own answers) or, for a blank request line, a closed
connection, and the server goes on serving the next client."""

from __future__ import annotations

import re
import socket
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hypothesis import example, given
from hypothesis import strategies as st

from tests.support.fuzzing import documents, fuzz, spoiled, time_bound, to_json, weird_text
from updater.reboot.lockd import LockServer
from updater.reboot.semaphore import MemoryStore

pytestmark = fuzz

BODY = {"client_params": {"id": "machine-1", "group": "default"}}
STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3}) [^\r\n]*\r\n")


class WatchedLockServer(LockServer):
    """berth-lockd that keeps what socketserver would only print: an exception in a handler."""

    errors: list[str]

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.errors.append(traceback.format_exc())


@pytest.fixture(scope="module")
def lockd() -> Iterator[WatchedLockServer]:
    running = WatchedLockServer(
        ("127.0.0.1", 0), MemoryStore(), 2, idle_timeout=1.0, read_timeout=1.0
    )
    running.errors = []
    running.start()
    yield running
    running.stop()


header_value = st.one_of(
    weird_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"true", b"TRUE", b"", b"\xff\xfe", b"\xb2", b"-1", b"99999999999999999999"]),
    st.binary(max_size=16),
)


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    """A FleetLock request with its parts mutated: method, path, version, headers and body."""
    body = draw(documents(BODY, to_json))
    method = draw(st.sampled_from([b"POST", b"POST", b"GET", b"PUT", b"post", b"", b"\xff"]))
    path = draw(
        st.sampled_from([b"/v1/pre-reboot", b"/v1/steady-state", b"/v1/pre-reboot/?x", b"/", b"*"])
        | st.binary(max_size=20)
    )
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1", b"FOO", b""]))
    headers = {
        b"Host": b"lockd",
        b"fleet-lock-protocol": b"true",
        b"Content-Length": b"%d" % len(body),
    }
    for name in draw(st.lists(st.sampled_from([*sorted(headers), b"Transfer-Encoding", b"X"]))):
        headers[name] = draw(header_value)
    line = b" ".join(part for part in (method, path, version) if part)
    head = line + b"\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers.items())
    return draw(spoiled((head + b"\r\n").decode("latin-1"), encoding="latin-1")) + body


def exchange(server: LockServer, data: bytes) -> bytes | None:
    """Send `data`, end the sending side, and read everything the server answers.

    None when the server refused and closed before it had all of `data` (a header line over
    64 KiB): the kernel then resets the connection and may drop the answer already sent.
    """
    host, port = server.server_address[:2]
    with socket.create_connection((str(host), port), timeout=5) as connection:
        try:
            connection.sendall(data)
            connection.shutdown(socket.SHUT_WR)
        except OSError:
            return None
        reply = b""
        try:
            while chunk := connection.recv(65536):
                reply += chunk
        except ConnectionResetError:
            return None
        return reply


# A request line with a bad version: answered HTTP/0.9 style, without a status line.
@example(b"POST /v1/pre-reboot FOO\r\n\r\n")
@example(b'{"client_params": {"id": "machine-1", "group": "default"}}')
# A Content-Length of "²": isdigit() passed it, int() raised, the client got no answer.
@example(
    b"POST /v1/pre-reboot HTTP/1.1\r\nfleet-lock-protocol: true\r\nContent-Length: \xb2\r\n\r\n"
)
@given(raw_requests())
def test_lockd_answers_every_request_and_keeps_serving(
    lockd: WatchedLockServer, data: bytes
) -> None:
    with time_bound(8):
        reply = exchange(lockd, data)
        line = data.split(b"\n", 1)[0]
        if reply is None:
            pass
        elif not line.strip():
            assert reply == b""
        else:
            match = STATUS_LINE.match(reply)
            assert match is not None, f"not an HTTP response: {reply[:200]!r}"
            status = int(match[1])
            words = line.split()
            assert (
                200 <= status < 300
                or 400 <= status < 500
                or (status == 501 and words[0] != b"POST")
                or (status == 505 and words[-1] not in (b"HTTP/1.0", b"HTTP/1.1"))
            ), reply[:200]
        answer = requests.post(
            lockd.url + "v1/steady-state",
            json=BODY,
            headers={"fleet-lock-protocol": "true"},
            timeout=5,
        )
        assert answer.status_code == 200
        assert not lockd.errors, lockd.errors.pop()
