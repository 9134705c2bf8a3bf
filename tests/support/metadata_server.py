"""Cloud metadata services on one loopback port, checking what the real ones check.

EC2 IMDSv2 (a session token from `PUT /latest/api/token`, required on every GET), GCE
(`Metadata-Flavor: Google` both ways), Azure IMDS (`Metadata: true`, the api-version) and
OpenStack. Unit tests point the agent's sources at it; VM tests forward the guest's
169.254.169.254:80 to it through QEMU's user network.
"""

from __future__ import annotations

import http.server
import threading
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urlsplit

TOKEN = "AQAEAFTx-token=="


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


class MetadataServer(http.server.ThreadingHTTPServer):
    """EC2 IMDSv2, GCE, Azure IMDS and OpenStack metadata on one loopback port."""

    daemon_threads = True

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _MetadataHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.seen: list[Seen] = []
        self.user_data: bytes | None = None
        self.ec2_meta: dict[str, str] = {"instance-id": "i-0abc", "local-hostname": "ip-10-0-0-5"}
        self.token = TOKEN
        self.gce_user_data: bytes | None = None
        self.gce_flavor = True
        self.azure_user_data: bytes | None = None
        self.openstack_user_data: bytes | None = None
        self.unavailable = 0  # answer this many requests with 503 first
        self.status: dict[str, int] = {}  # path -> forced status

    def answer(self, handler: _MetadataHandler, method: str) -> None:
        split = urlsplit(handler.path)
        headers = {k.lower(): v for k, v in handler.headers.items()}
        self.seen.append(Seen(method, handler.path, headers))
        if self.unavailable:
            self.unavailable -= 1
            return handler.reply(503)
        if split.path in self.status:
            return handler.reply(self.status[split.path])
        if split.path == "/latest/api/token":
            if method != "PUT" or headers.get("x-aws-ec2-metadata-token-ttl-seconds") != "21600":
                return handler.reply(400)
            return handler.reply(200, self.token.encode())
        if split.path.startswith("/latest/"):
            if method != "GET":
                return handler.reply(405)
            # IMDSv2 only: a GET without a valid session token is refused.
            if headers.get("x-aws-ec2-metadata-token") != TOKEN:
                return handler.reply(401)
            if split.path == "/latest/user-data":
                return handler.reply(*self._body(self.user_data))
            key = split.path.removeprefix("/latest/meta-data/")
            return handler.reply(*self._body(self.ec2_meta.get(key, "").encode() or None))
        if split.path.startswith("/computeMetadata/v1/"):
            if headers.get("metadata-flavor") != "Google":
                return handler.reply(403)
            extra = {"Metadata-Flavor": "Google"} if self.gce_flavor else {}
            if split.path == "/computeMetadata/v1/instance/attributes/user-data":
                return handler.reply(*self._body(self.gce_user_data), headers=extra)
            return handler.reply(404, headers=extra)
        if split.path == "/metadata/instance/compute/userData":
            if headers.get("metadata") != "true":
                return handler.reply(400)
            if split.query != "api-version=2021-01-01&format=text":
                return handler.reply(400)
            return handler.reply(200, self.azure_user_data or b"")
        if split.path == "/openstack/latest/user_data":
            return handler.reply(*self._body(self.openstack_user_data))
        return handler.reply(404)

    @staticmethod
    def _body(data: bytes | None) -> tuple[int, bytes]:
        return (404, b"") if data is None else (200, data)

    def paths(self) -> list[str]:
        return [f"{s.method} {s.path}" for s in self.seen]

    def __enter__(self) -> MetadataServer:
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.shutdown()
        self.server_close()


class _MetadataHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: MetadataServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.answer(self, "GET")

    def do_PUT(self) -> None:
        self.server.answer(self, "PUT")

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
