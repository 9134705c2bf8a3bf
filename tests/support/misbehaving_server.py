"""HTTP peers on loopback that misbehave on request, where nginx cannot: one server for every
test whose peer must fail in a chosen way or speak a protocol nginx does not.

`MisbehavingServer` is a static server. It answers from `files` (path -> bytes, set by the
test) or from a directory `root`, honours `Range` as nginx does (`bytes=N-`, `bytes=A-B`, and
several ranges as multipart/byteranges; 206, or 416 from beyond the end), and keeps every
request it saw in `seen`. A `Misbehaviour` in `rules` whose `match` is in a request's target
(path and query) takes that request over: another status, a TCP reset before any answer, a
body cut at some byte with a close or a reset, endless data, a missing or lying
Content-Length, the Range ignored, ranges answered with other bytes or with broken multipart
framing, a trickle, or silence before the answer or after its headers. The first rule that
matches and is not spent (`times`) wins, so rules script a sequence: `fail("/x", 503, 502)`
answers two failures, then the file.

Protocol stand-ins answer in `respond` instead of serving files, and misbehave the same way:
`MetadataServer` (EC2 IMDSv2, GCE, Azure IMDS and OpenStack on one port) and `WireServer`
(Azure's goal state and Ready report). Below HTTP, `HalfCloseServer` answers only after the
client's half-close, `silent_port` accepts connections and never answers, and
`refusing_port` refuses them.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import socket
import struct
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

import pytest
from requests.structures import CaseInsensitiveDict

from updater.provision.azure import GoalState, parse_goal_state

KiB = 1024
# Every handler ends by itself within this, whatever the client does (endless data, a trickle).
_HANDLER_DEADLINE = 10.0


@dataclass
class Misbehaviour:
    """How the server answers the requests this rule takes over; each field is one misbehaviour."""

    match: str = ""  # a substring of the request target (path and query); "" matches every one
    times: int | None = None  # how many requests it takes over before it is spent; None: all
    ranged: bool = False  # only requests with a Range header
    status: int | None = None  # answer this status and no body (a 3xx one with a Location)
    reset_at_once: bool = False  # close with a TCP reset before answering
    cut_at: int | None = None  # stop the body at this byte offset of the file...
    reset: bool = False  # ... with a TCP reset instead of a clean close
    endless: bool = False  # no Content-Length, then data until the client hangs up
    declare_length: bool = True  # False: no Content-Length, the body ends with the connection
    declared_length: int | None = None  # a Content-Length that lies
    ignore_range: bool = False  # the whole file with 200, whatever the Range asked for
    single_ranges: bool = False  # the whole file with 200 to a Range of several (object stores)
    garble_ranges: bool = False  # 206 answers whose bytes are not the file's (each one inverted)
    botch_multipart: bool = False  # multipart answers whose parts use another boundary
    piece: int = 64 * KiB  # the body goes out in pieces of this size...
    delay: float = 0.0  # ... this many seconds apart (slow retrieval)
    wait: float = 0.0  # seconds of silence before the status line
    stall: float = 0.0  # seconds of silence after the headers


@dataclass
class Seen:
    """One request as the server saw it; `status` and `sent` are filled in as it answers."""

    method: str
    path: str  # the request target: path and query
    headers: CaseInsensitiveDict[str]
    body: bytes
    range: str | None
    status: int = 0  # 0: reset before any answer
    sent: int = 0  # body bytes written so far


@dataclass(frozen=True)
class Answer:
    """What the server would say without misbehaving."""

    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)


_INVERT = bytes(range(255, -1, -1))


def _parse_ranges(spec: str | None, size: int) -> list[tuple[int, int]] | None:
    """The satisfiable ranges of a `Range: bytes=...` header as (first, last), as nginx reads
    them; None for no (or an unreadable) Range header, [] when none is satisfiable."""
    if not spec or not spec.startswith("bytes="):
        return None
    out = []
    for part in spec.removeprefix("bytes=").split(","):
        match = re.fullmatch(r"\s*(\d+)-(\d*)\s*", part)
        if match is None:
            return None
        first = int(match[1])
        last = min(int(match[2]), size - 1) if match[2] else size - 1
        if first <= last:
            out.append((first, last))
    return out


def _multipart(data: bytes, asked: list[tuple[int, int]], rule: Misbehaviour) -> tuple[bytes, str]:
    """A multipart/byteranges body of `asked` and its Content-Type (nginx's framing)."""
    boundary = "00000000000000000001"
    written = "00000000000000000002" if rule.botch_multipart else boundary
    body = b""
    for first, last in asked:
        body += (
            f"\r\n--{written}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Range: bytes {first}-{last}/{len(data)}\r\n\r\n"
        ).encode() + data[first : last + 1]
    body += f"\r\n--{written}--\r\n".encode()
    return body, f"multipart/byteranges; boundary={boundary}"


def _reset(sock: socket.socket) -> None:
    # SO_LINGER with a zero timeout turns close() into a TCP reset.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: MisbehavingServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._answer("GET")

    def do_HEAD(self) -> None:
        self._answer("HEAD")

    def do_PUT(self) -> None:
        self._answer("PUT")

    def do_POST(self) -> None:
        self._answer("POST")

    def _answer(self, method: str) -> None:
        # One request per connection: a misbehaviour never leaks into a kept-alive one.
        self.close_connection = True
        length = int(self.headers.get("Content-Length") or 0)
        seen = Seen(
            method,
            self.path,
            CaseInsensitiveDict(dict(self.headers.items())),
            self.rfile.read(length) if length else b"",
            self.headers.get("Range"),
        )
        rule, answer = self.server._take(seen)
        if rule.wait:
            time.sleep(rule.wait)
        if rule.reset_at_once:
            _reset(self.connection)
            return
        if answer is None:  # the rule's status instead of the answer
            assert rule.status is not None
            headers = {"Location": "/elsewhere"} if 300 <= rule.status < 400 else {}
            self._head(seen, rule.status, headers, 0)
            return
        self._send(seen, rule, answer)

    def _head(
        self, seen: Seen, status: int, headers: Mapping[str, str], length: int | None
    ) -> None:
        seen.status = status
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.flush()

    def _send(self, seen: Seen, rule: Misbehaviour, answer: Answer) -> None:
        data, status, headers = answer.body, answer.status, dict(answer.headers)
        start = 0
        asked = _parse_ranges(seen.range, len(data))
        if rule.single_ranges and asked is not None and len(asked) > 1:
            asked = None
        if status == 200 and asked is not None and not rule.ignore_range:
            if not asked:
                self._head(seen, 416, {}, 0)
                return
            status = 206
            if rule.garble_ranges:
                data = data.translate(_INVERT)
            if len(asked) > 1:
                data, headers["Content-Type"] = _multipart(data, asked, rule)
            else:
                first, last = asked[0]
                headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
                data = data[: last + 1]
                start = first
        if rule.declared_length is not None:
            length: int | None = rule.declared_length
        elif rule.declare_length and not rule.endless:
            length = len(data) - start
        else:
            length = None
        self._head(seen, status, headers, length)
        if seen.method == "HEAD":
            return
        if rule.stall:
            time.sleep(rule.stall)
        end = len(data) if rule.cut_at is None else min(len(data), rule.cut_at)
        position = start
        deadline = time.monotonic() + _HANDLER_DEADLINE
        try:
            while time.monotonic() < deadline:
                if rule.endless:
                    piece = b"x" * rule.piece
                else:
                    piece = data[position : min(end, position + rule.piece)]
                    if not piece:
                        break
                self.wfile.write(piece)
                self.wfile.flush()
                position += len(piece)
                seen.sent += len(piece)
                if rule.delay:
                    time.sleep(rule.delay)
        except (BrokenPipeError, ConnectionResetError):
            return
        if rule.cut_at is not None and rule.reset:
            _reset(self.connection)


# A request no rule takes over is answered as this rule says: no misbehaviour at all.
_BEHAVE = Misbehaviour()


class MisbehavingServer(http.server.ThreadingHTTPServer):
    """Serves `files` and the directory `root` at `url`; `rules` decide where it misbehaves."""

    daemon_threads = True

    def __init__(self, root: Path | None = None, *, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.root = root.resolve() if root is not None else None
        self.files: dict[str, bytes] = {}
        self.rules: list[Misbehaviour] = []
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        """The base URL, without a trailing slash."""
        return f"http://127.0.0.1:{self.port}"

    def fail(self, match: str, *statuses: int) -> None:
        """Answer the next requests that match with these statuses, one each, in turn."""
        self.rules += [Misbehaviour(match, times=1, status=status) for status in statuses]

    def requests(self, method: str | None = None) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if method is None or s.method == method]

    def paths(self) -> list[str]:
        """What was asked, as `METHOD target` lines."""
        return [f"{s.method} {s.path}" for s in self.requests()]

    def respond(self, seen: Seen) -> Answer:
        """The answer without misbehaviour: a file. Stand-ins for protocols override this."""
        path = seen.path.split("?", 1)[0]
        if path in self.files:
            return Answer(200, self.files[path])
        if self.root is not None:
            file = (self.root / path.lstrip("/")).resolve()
            if file.is_file() and self.root in file.parents:
                return Answer(200, file.read_bytes())
        return Answer(404)

    def _take(self, seen: Seen) -> tuple[Misbehaviour, Answer | None]:
        """Log the request, pick its rule, and answer it unless the rule's status replaces that.
        Under the lock, so a stand-in's state moves one request at a time."""
        with self.lock:
            self.seen.append(seen)
            rule = next(
                (
                    r
                    for r in self.rules
                    if r.match in seen.path and r.times != 0 and (seen.range or not r.ranged)
                ),
                _BEHAVE,
            )
            if rule.times is not None:
                rule.times -= 1
            if rule.reset_at_once or rule.status is not None:
                return rule, None
            return rule, self.respond(seen)

    def start(self) -> Self:
        self._thread = threading.Thread(target=self.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def misbehaving() -> Iterator[Callable[..., MisbehavingServer]]:
    """A factory: `misbehaving(root=None)` starts a server; all stop at teardown."""
    servers: list[MisbehavingServer] = []

    def start(root: Path | None = None) -> MisbehavingServer:
        server = MisbehavingServer(root).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


# -- Cloud metadata services -------------------------------------------------------------------

TOKEN = "AQAEAFTx-token=="


class MetadataServer(MisbehavingServer):
    """EC2 IMDSv2, GCE, Azure IMDS and OpenStack metadata on one loopback port, checking what
    the real ones check: IMDSv2's session token from `PUT /latest/api/token` on every GET,
    `Metadata-Flavor: Google` both ways, Azure's `Metadata: true` and api-version.

    Unit tests point the agent's sources at it; VM tests forward the guest's 169.254.169.254:80
    to it through QEMU's user network."""

    def __init__(self, port: int = 0) -> None:
        super().__init__(port=port)
        self.user_data: bytes | None = None
        self.ec2_meta: dict[str, str] = {"instance-id": "i-0abc", "local-hostname": "ip-10-0-0-5"}
        self.token = TOKEN  # what the token endpoint hands out; only TOKEN is accepted
        self.gce_user_data: bytes | None = None
        self.gce_flavor = True  # the answer carries Metadata-Flavor: Google
        self.azure_user_data: bytes | None = None
        self.openstack_user_data: bytes | None = None
        # The launch key pairs: EC2's public-keys ("name" -> OpenSSH key), GCE's ssh-keys
        # attributes by path under /computeMetadata/v1/ ("instance/attributes/ssh-keys",
        # "project/attributes/ssh-keys", "instance/attributes/block-project-ssh-keys"), and
        # Azure's publicKeys document (None: the answer is 404; bytes: sent as they are).
        self.ec2_keys: dict[str, str] = {}
        self.gce_attributes: dict[str, bytes] = {}
        self.azure_keys: list[dict[str, str]] | bytes | None = None

    def respond(self, seen: Seen) -> Answer:
        split = urlsplit(seen.path)
        headers = seen.headers
        if split.path == "/latest/api/token":
            if (
                seen.method != "PUT"
                or headers.get("x-aws-ec2-metadata-token-ttl-seconds") != "21600"
            ):
                return Answer(400)
            return Answer(200, self.token.encode())
        if split.path.startswith("/latest/"):
            if seen.method != "GET":
                return Answer(405)
            # IMDSv2 only: a GET without a valid session token is refused.
            if headers.get("x-aws-ec2-metadata-token") != TOKEN:
                return Answer(401)
            if split.path == "/latest/user-data":
                return _found(self.user_data)
            if split.path.startswith("/latest/meta-data/public-keys/"):
                return self._ec2_key(split.path.removeprefix("/latest/meta-data/public-keys/"))
            key = split.path.removeprefix("/latest/meta-data/")
            return _found(self.ec2_meta.get(key, "").encode() or None)
        if split.path.startswith("/computeMetadata/v1/"):
            if headers.get("metadata-flavor") != "Google":
                return Answer(403)
            extra = {"Metadata-Flavor": "Google"} if self.gce_flavor else {}
            if split.path == "/computeMetadata/v1/instance/attributes/user-data":
                return _found(self.gce_user_data, extra)
            attribute = self.gce_attributes.get(split.path.removeprefix("/computeMetadata/v1/"))
            return _found(attribute, extra)
        if split.path == "/metadata/instance/compute/userData":
            if headers.get("metadata") != "true":
                return Answer(400)
            if split.query != "api-version=2021-01-01&format=text":
                return Answer(400)
            return Answer(200, self.azure_user_data or b"")
        if split.path == "/metadata/instance/compute/publicKeys":
            if headers.get("metadata") != "true" or split.query != "api-version=2021-02-01":
                return Answer(400)
            if isinstance(self.azure_keys, bytes):
                return Answer(200, self.azure_keys)
            return _found(None if self.azure_keys is None else json.dumps(self.azure_keys).encode())
        if split.path == "/openstack/latest/user_data":
            return _found(self.openstack_user_data)
        return Answer(404)

    def _ec2_key(self, rest: str) -> Answer:
        """`public-keys/` lists "0=name" lines; `public-keys/0/openssh-key` is the key."""
        names = list(self.ec2_keys)
        if rest == "":
            listing = "\n".join(f"{i}={name}" for i, name in enumerate(names))
            return _found(listing.encode() or None)
        index, _, leaf = rest.partition("/")
        if not index.isdigit() or int(index) >= len(names):
            return Answer(404)
        if leaf in ("", "openssh-key/"):
            return Answer(200, b"openssh-key")
        if leaf == "openssh-key":
            return Answer(200, self.ec2_keys[names[int(index)]].encode() + b"\n")
        return Answer(404)


def _found(data: bytes | None, headers: Mapping[str, str] | None = None) -> Answer:
    return Answer(404, headers=headers or {}) if data is None else Answer(200, data, headers or {})


# -- Azure's WireServer ------------------------------------------------------------------------

CONTAINER = "5f3c2a9e-81d4-4b6f-9a0e-2c7d1b8e4f60"
INSTANCE = "0b7e4c1a92d34f6e8a5b3c2d1e0f9a8b.berth-vm-1"


def goal_state_xml(
    incarnation: str = "3", container: str = CONTAINER, instance: str = INSTANCE
) -> bytes:
    """A goal state shaped like what Azure hosts answer (version 2012-11-30)."""
    config = f"http://100.72.14.9:80/machine/{container}/{instance}?comp=config"
    return f"""\
<?xml version="1.0" encoding="utf-8"?>
<GoalState xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" \
xsi:noNamespaceSchemaLocation="goalstate10.xsd">
  <Version>2012-11-30</Version>
  <Incarnation>{escape(incarnation)}</Incarnation>
  <Machine>
    <ExpectedState>Started</ExpectedState>
    <StopRolesDeadlineHint>300000</StopRolesDeadlineHint>
    <LBProbePorts>
      <Port>16001</Port>
    </LBProbePorts>
    <ExpectHealthReport>FALSE</ExpectHealthReport>
  </Machine>
  <Container>
    <ContainerId>{escape(container)}</ContainerId>
    <RoleInstanceList>
      <RoleInstance>
        <InstanceId>{escape(instance)}</InstanceId>
        <State>Started</State>
        <Configuration>
          <HostingEnvironmentConfig>{escape(config)}&amp;type=hostingEnvironmentConfig\
</HostingEnvironmentConfig>
          <SharedConfig>{escape(config)}&amp;type=sharedConfig</SharedConfig>
          <ExtensionsConfig>{escape(config)}&amp;type=extensionsConfig</ExtensionsConfig>
          <FullConfig>{escape(config)}&amp;type=fullConfig</FullConfig>
          <ConfigName>0b7e4c1a92d34f6e8a5b3c2d1e0f9a8b.0.berth-vm-1.1.xml</ConfigName>
        </Configuration>
      </RoleInstance>
    </RoleInstanceList>
  </Container>
</GoalState>
""".encode()


class WireServer(MisbehavingServer):
    """Azure's WireServer where it matters: goal states served in turn, and a health report
    accepted only when it names the current container, instance and incarnation (a stale
    incarnation is 410 Gone, as on Azure). Tests script failures with `fail`."""

    def __init__(self) -> None:
        super().__init__()
        # Served in turn, the last one repeatedly. The fabric's current goal state is the one
        # the next GET would serve, so [a, b] means "it changed right after a was read".
        self.goal_states: list[bytes] = [goal_state_xml()]
        self.served = 0

    def current(self) -> GoalState:
        body = self.goal_states[min(self.served, len(self.goal_states) - 1)]
        return parse_goal_state(body, "test")

    def respond(self, seen: Seen) -> Answer:
        xml = {"Content-Type": "text/xml; charset=utf-8"}
        if seen.method == "GET" and seen.path == "/machine/?comp=goalstate":
            body = self.goal_states[min(self.served, len(self.goal_states) - 1)]
            self.served += 1
            return Answer(200, body, xml)
        if seen.method == "POST" and seen.path == "/machine/?comp=health":
            report = ET.fromstring(seen.body)
            current = self.current()
            if report.findtext("GoalStateIncarnation") != current.incarnation:
                return Answer(410, headers=xml)
            role = report.find("Container/RoleInstanceList/Role")
            if (
                report.findtext("Container/ContainerId") != current.container_id
                or role is None
                or role.findtext("InstanceId") != current.instance_id
            ):
                return Answer(400, headers=xml)
            return Answer(200, headers=xml)
        return Answer(404, headers=xml)


# -- Below HTTP ----------------------------------------------------------------------------------


class HalfCloseServer:
    """A raw TCP peer for one connection: it reads until the client's half-close (its FIN) and
    only then answers `reply(received)`, so an answer proves the half-close got through."""

    def __init__(self, reply: Callable[[bytes], bytes]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.received = b""
        self._reply = reply
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            while chunk := conn.recv(65536):
                self.received += chunk
            conn.sendall(self._reply(self.received))

    def close(self) -> None:
        self.sock.close()
        self._thread.join(timeout=5)


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers: the kernel completes them into the
    listen backlog and nothing ever reads them, like a server that hangs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A port that refuses connections: bound but not listening, so no other program can take
    it while the test runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
