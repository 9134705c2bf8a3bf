"""berth-lockd: a FleetLock server backed by airlock's semaphore in etcd.

    python3 -m updater.reboot.lockd --etcd URL[,URL...] --listen HOST:PORT [--slots N]
                             [--ca-file F] [--cert-file F --key-file F]

For sites that want FleetLock (Berth's `fleet-lock` strategy, Zincati's `fleet_lock`) without
running Go's airlock. It keeps no state of its own: every request reads and compare-and-swaps the
group's semaphore in etcd (reboot.semaphore), so any number of replicas can serve the same fleet
behind one name, and it shares the semaphore with airlock and with `etcd-lock` machines.

    POST /v1/pre-reboot     200: the id holds a slot (now or already);
                            409 {"kind": "failed_lock_semaphore_full", ...}: all slots are held
    POST /v1/steady-state   200: the id holds no slot (released now or never held)

Errors are JSON {"kind": ..., "value": ...} as the protocol recommends: 400 for a malformed request
(missing `fleet-lock-protocol: true` header, bad JSON, an empty, unprintable or over-long id, a bad
group), 411 without a Content-Length, 413 for a body over MAX_BODY, 502 when etcd cannot be
reached. `--slots` is the slot count of a group whose semaphore does not exist yet; an existing
semaphore keeps its own (`berth-update lock slots N` changes it).

Anyone who can reach the port can send it anything, so its work is bounded: a connection has
IDLE_TIMEOUT seconds to start a request and READ_TIMEOUT seconds to finish sending it (a client
trickling one byte a second is cut off), at most MAX_CONNECTIONS are served at once (the next
ones wait in the listen queue, never in a thread of their own), and every log line escapes what
the client sent.

Runs on any host with Python 3.11+ and python3-requests; on Berth as berth-lockd.service.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from updater.reboot.etcdlock import EtcdStore, TLSFiles
from updater.reboot.semaphore import (
    GROUP_NAME,
    HOLDER_MAX_BYTES,
    LockError,
    SemaphoreClient,
    Store,
    holder_problem,
)

log = logging.getLogger("berth-lockd")
# A FleetLock body with the longest id and group is under 700 bytes.
MAX_BODY = 8 * 1024
# Seconds a connection may wait before its next request starts (the first one included).
IDLE_TIMEOUT = 10.0
# Seconds from a request's first byte to its last: a request is a few hundred bytes, which any
# client sends at once; a slow trickle is an attack on the connection limit.
READ_TIMEOUT = 10.0
# Connections served at once. A request takes milliseconds (one etcd read and write); a fleet of
# thousands asks only around reboots. The rest wait in the kernel's listen queue.
MAX_CONNECTIONS = 64
LISTEN_QUEUE = 128
PRE_REBOOT = "/v1/pre-reboot"
STEADY_STATE = "/v1/steady-state"


def escape(text: str) -> str:
    """`text` for a log line: Python's backslash escapes for everything not printable (newlines,
    carriage returns, terminal escape sequences, bidi overrides), so that no input forges a line
    or rewrites one on a terminal."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


class _EscapeFilter(logging.Filter):
    """Escapes each record of the berth-lockd logger once formatted: request data reaches log
    lines through many paths (the request line, ids, errors), and this catches them all."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        shown = escape(message)
        if shown != message:
            record.msg, record.args = shown, None
        return True


log.addFilter(_EscapeFilter())


class RequestError(Exception):
    def __init__(self, status: HTTPStatus, kind: str, value: str) -> None:
        super().__init__(value)
        self.status, self.kind, self.value = status, kind, value


def parse_request(header: str | None, body: bytes) -> tuple[str, str]:
    """(id, group) from a FleetLock request, or RequestError saying what is wrong."""
    if header != "true":
        raise RequestError(
            HTTPStatus.BAD_REQUEST, "missing_header", "header 'fleet-lock-protocol: true' missing"
        )
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(HTTPStatus.BAD_REQUEST, "bad_body", f"body is not JSON: {e}") from None
    params = doc.get("client_params") if isinstance(doc, dict) else None
    if not isinstance(params, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, "bad_body", "field 'client_params' missing")
    # "node_uuid" is what the first airlock releases called the id.
    holder = params.get("id", params.get("node_uuid"))
    group = params.get("group")
    if not isinstance(holder, str) or not holder:
        raise RequestError(HTTPStatus.BAD_REQUEST, "bad_id", "field 'client_params.id' is empty")
    problem = holder_problem(holder)
    if problem is not None:
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            "bad_id",
            f"field 'client_params.id': expected {problem}, got {_shown(holder)}",
        )
    if not isinstance(group, str) or not GROUP_NAME.fullmatch(group):
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            "bad_group",
            f"field 'client_params.group' must match ^[a-zA-Z0-9.-]+$ and be at most "
            f"{HOLDER_MAX_BYTES} bytes, got {_shown(group)}",
        )
    return holder, group


def _shown(value: object) -> str:
    """A client's value in an answer: its repr (escaped), cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Deadlines(io.RawIOBase):
    """The connection's reading side, with a deadline for each phase of a request.

    A socket timeout bounds one read; a client sending a byte a second never trips it. Here
    every read gets what is left of the phase's deadline: IDLE_TIMEOUT to start a request, then
    READ_TIMEOUT from its first byte until the handler has read all of it.
    """

    def __init__(self, connection: socket.socket, idle: float, read: float) -> None:
        super().__init__()
        self._connection = connection
        self._idle, self._read = idle, read
        self._deadline = 0.0
        self._started = False
        self.next_request()

    def next_request(self) -> None:
        self._started = False
        self._deadline = time.monotonic() + self._idle

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the client was too slow")
        self._connection.settimeout(left)
        count = self._connection.recv_into(buffer)
        if count and not self._started:
            self._started = True
            self._deadline = time.monotonic() + self._read
        return count


class LockServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = LISTEN_QUEUE

    def __init__(
        self,
        address: tuple[str, int],
        store: Store,
        default_slots: int,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.store = store
        self.default_slots = default_slots
        self.idle_timeout = idle_timeout
        self.read_timeout = read_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Waiting here stops accepting: further clients queue in the kernel, and no thread is
        # started for a connection that could not be served anyway.
        while not self._slots.acquire(timeout=0.2):
            if self._stopping.is_set():
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown(self) -> None:
        self._stopping.set()
        super().shutdown()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/"

    def handle_lock(self, path: str, holder: str, group: str) -> tuple[HTTPStatus, dict[str, Any]]:
        semaphore = SemaphoreClient(self.store, group, self.default_slots)
        if path == PRE_REBOOT:
            outcome = semaphore.acquire(holder)
            s = outcome.semaphore
            if not outcome.ok:
                return HTTPStatus.CONFLICT, {
                    "kind": "failed_lock_semaphore_full",
                    "value": f"semaphore of group {group} full: {len(s.holders)} of "
                    f"{s.total_slots} slots held",
                }
            if outcome.changed:
                log.info("%s: %s took a slot (%d/%d)", group, holder, len(s.holders), s.total_slots)
        else:
            outcome = semaphore.release(holder)
            s = outcome.semaphore
            if outcome.changed and holder not in s.holders:
                log.info(
                    "%s: %s released its slot (%d/%d)", group, holder, len(s.holders), s.total_slots
                )
        return HTTPStatus.OK, {}

    def start(self) -> LockServer:
        """Serve in a background thread (tests, embedding); `stop()` ends it."""
        # A short poll: stop() waits for the loop to notice, and tests stop servers often.
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join()


class _Handler(BaseHTTPRequestHandler):
    server: LockServer
    protocol_version = "HTTP/1.1"
    # The stdlib answers a request line it cannot read as HTTP/0.9 would: a bare HTML page with
    # no status line, which no client can parse. berth-lockd never speaks 0.9.
    default_request_version = "HTTP/1.0"

    def setup(self) -> None:
        super().setup()
        self._deadlines = _Deadlines(
            self.connection, self.server.idle_timeout, self.server.read_timeout
        )
        self.rfile = io.BufferedReader(self._deadlines)

    def handle_one_request(self) -> None:
        self._deadlines.next_request()
        super().handle_one_request()

    def _reply(self, status: HTTPStatus, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        # The answer is small enough for the socket's buffer; the timeout only catches a client
        # that stopped reading long ago.
        self.connection.settimeout(self.server.read_timeout)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        if "Transfer-Encoding" in self.headers:
            raise RequestError(
                HTTPStatus.LENGTH_REQUIRED, "bad_body", "a body with Content-Length, not chunked"
            )
        text = self.headers.get("Content-Length") or "0"
        # isdigit() alone takes "²", which int() refuses.
        if not (text.isascii() and text.isdigit()):
            raise RequestError(HTTPStatus.BAD_REQUEST, "bad_body", "bad Content-Length")
        if int(text) > MAX_BODY:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "bad_body", f"body over {MAX_BODY} bytes"
            )
        return self.rfile.read(int(text))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            body = self._body()
            if path not in (PRE_REBOOT, STEADY_STATE):
                raise RequestError(HTTPStatus.NOT_FOUND, "not_found", f"no endpoint {path}")
            holder, group = parse_request(self.headers.get("fleet-lock-protocol"), body)
            status, doc = self.server.handle_lock(path, holder, group)
        except RequestError as e:
            log.debug("%s: refused %s: %s", self.address_string(), path, e.value)
            if e.status in (HTTPStatus.LENGTH_REQUIRED, HTTPStatus.REQUEST_ENTITY_TOO_LARGE):
                # The body was not read: what follows on the connection is not a request.
                self.close_connection = True
            status, doc = e.status, {"kind": e.kind, "value": e.value}
        except LockError as e:
            log.error("%s", e)
            status, doc = HTTPStatus.BAD_GATEWAY, {"kind": "failed_etcd", "value": str(e)}
        self._reply(status, doc)

    def log_message(self, format: str, *args: Any) -> None:
        # The request line and headers in these are the client's: the logger's filter escapes.
        log.debug("%s %s", self.address_string(), format % args)


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT like 0.0.0.0:8080, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _endpoints(text: str) -> list[str]:
    return [e for e in text.split(",") if e]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="berth-lockd", description=__doc__.splitlines()[0])
    p.add_argument(
        "--etcd",
        type=_endpoints,
        required=True,
        action="extend",
        help="etcd client URL(s), comma-separated or repeated",
    )
    p.add_argument("--listen", type=_listen, required=True, help="HOST:PORT to serve on")
    p.add_argument(
        "--slots",
        type=int,
        default=1,
        help="slot count of a group whose semaphore does not exist yet (default 1)",
    )
    p.add_argument("--ca-file", type=Path, help="CA to verify etcd's certificate")
    p.add_argument("--cert-file", type=Path, help="client certificate for etcd")
    p.add_argument("--key-file", type=Path, help="key of the client certificate")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="berth-lockd: %(message)s",
        stream=sys.stderr,
    )
    if args.slots < 1:
        print("berth-lockd: --slots must be at least 1", file=sys.stderr)
        return 2
    if (args.cert_file is None) != (args.key_file is None):
        print("berth-lockd: --cert-file and --key-file go together", file=sys.stderr)
        return 2
    try:
        store = EtcdStore(args.etcd, TLSFiles(args.ca_file, args.cert_file, args.key_file))
        server = LockServer(args.listen, store, args.slots)
    except (LockError, OSError) as e:
        print(f"berth-lockd: {e}", file=sys.stderr)
        return 1
    log.info("serving FleetLock on %s with etcd %s", server.url, ",".join(args.etcd))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
