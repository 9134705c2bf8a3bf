"""A static file server on loopback that misbehaves for chosen paths, where nginx cannot.

Serves a directory with GET, HEAD and `Range: bytes=N-` like any static server; a request whose
path contains `Misbehaviour.match` gets the misbehaviour instead: a reset before any answer, a
reset after some bytes, endless data, a lying Content-Length, or a trickle.
"""

from __future__ import annotations

import http.server
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Misbehaviour:
    match: str  # a substring of the request path
    reset_at_once: bool = False  # any method: close with a TCP reset before answering
    reset_after: int | None = None  # GET: send the file up to this byte offset, then reset
    endless: bool = False  # GET: no Content-Length, then data forever (HEAD: no Content-Length)
    delay: float = 0.0  # GET: seconds between pieces (slow retrieval)
    piece: int = 16 * 1024


@dataclass
class Logged:
    method: str
    path: str
    range: str | None
    status: int


def _reset(sock: socket.socket) -> None:
    # SO_LINGER with a zero timeout turns close() into a TCP reset.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: MisbehavingServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, *, body: bool) -> None:
        srv = self.server
        path = self.path.split("?", 1)[0]
        rule = next((r for r in srv.rules if r.match in path), None)
        rng = self.headers.get("Range")
        method = "GET" if body else "HEAD"
        self.close_connection = True
        if rule is not None and rule.reset_at_once:
            srv.log.append(Logged(method, path, rng, 0))
            _reset(self.connection)
            return
        file = (srv.root / path.lstrip("/")).resolve()
        if not file.is_file() or srv.root not in file.parents:
            srv.log.append(Logged(method, path, rng, 404))
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = file.read_bytes()
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if match and int(match[1]) < len(data):
            start = int(match[1])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            srv.log.append(Logged(method, path, rng, 206))
        else:
            self.send_response(200)
            srv.log.append(Logged(method, path, rng, 200))
        if rule is None or not rule.endless:
            self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Connection", "close")
        self.end_headers()
        if not body:
            return
        if rule is None:
            self.wfile.write(data[start:])
            return
        position = start
        deadline = time.monotonic() + 10  # every handler ends by itself, whatever the client does
        try:
            while time.monotonic() < deadline:
                if rule.endless:
                    piece = b"x" * rule.piece
                else:
                    end = len(data) if rule.reset_after is None else rule.reset_after
                    piece = data[position : min(end, position + rule.piece)]
                    if not piece:
                        break
                self.wfile.write(piece)
                self.wfile.flush()
                position += len(piece)
                if rule.delay:
                    time.sleep(rule.delay)
        except (BrokenPipeError, ConnectionResetError):
            return
        if rule.reset_after is not None:
            _reset(self.connection)


class MisbehavingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root.resolve()
        self.rules: list[Misbehaviour] = []
        self.log: list[Logged] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


@pytest.fixture
def misbehaving() -> Iterator[list[MisbehavingServer]]:
    """Start servers with `MisbehavingServer(root)` and append them; all stop at teardown."""
    servers: list[MisbehavingServer] = []
    yield servers
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def start(root: Path, servers: list[MisbehavingServer]) -> MisbehavingServer:
    srv = MisbehavingServer(root)
    threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True).start()
    servers.append(srv)
    return srv
