"""A real nginx serving a directory on loopback, for tests that need HTTP with Range support.

nginx answers Range requests on static files by itself, so download-resume tests exercise what a
production web server or CDN does. Each server gets its own configuration, pid file and logs in a
private directory; the access log records the request, status, bytes sent and the Range header,
so a test can check what a client actually fetched.

Use `NginxServer` as a context manager:

    with NginxServer(repo_dir, tmp_path / "nginx") as server:
        requests.get(server.url + "metadata/timestamp.json")
        assert server.requests()[-1].status == 200
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from builder.run import find_tool
from qemu.vm import free_port

# One line per request; fields are separated by tabs so a request line with spaces stays whole.
_LOG_FORMAT = "$status\\t$body_bytes_sent\\t$request\\t$http_range"
_START_TIMEOUT = 10.0


@dataclass(frozen=True)
class Request:
    """One access log line."""

    status: int
    body_bytes: int  # response body bytes nginx sent (after a dropped connection: what went out)
    request: str  # e.g. "GET /targets/x HTTP/1.1"
    range: str | None  # the Range header, or None

    @property
    def path(self) -> str:
        parts = self.request.split(" ")
        return parts[1] if len(parts) >= 2 else self.request


class ServerProcess:
    """A server process in the foreground on a free loopback port (nginx, etcd, ...).

    `start` picks a port, spawns, and waits until the server answers, trying other ports when
    one was taken between probing and binding; `stop` sends `stop_signal`, then SIGKILL.
    """

    name = "server"
    stop_signal = signal.SIGTERM

    def __init__(self) -> None:
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        """The server's process (for nginx, its master), while it runs."""
        return None if self._process is None else self._process.pid

    def _spawn(self) -> subprocess.Popen[bytes]:
        """Start the server on `self.port`."""
        raise NotImplementedError

    def _ready(self) -> bool:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
        ):
            return True
        return False

    def start(self) -> Self:
        for _attempt in range(5):
            self.port = free_port()
            self._process = self._spawn()
            if self._wait_ready():
                return self
            self.stop()
        raise RuntimeError(f"{self.name} did not start; see {self.log_path}:\n{self._log_tail()}")

    def _wait_ready(self) -> bool:
        assert self._process is not None
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            if self._ready():
                return True
            time.sleep(0.02)
        return False

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(self.stop_signal)
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class NginxServer(ServerProcess):
    """nginx in the foreground serving `root` at http://127.0.0.1:<port>/.

    `extra_config` is inserted into the server block, e.g. a `location` with `limit_rate`.
    """

    name = "nginx"
    # SIGQUIT is nginx's graceful stop; SIGKILL follows if a worker hangs.
    stop_signal = signal.SIGQUIT

    def __init__(self, root: Path, work_dir: Path, extra_config: str = "") -> None:
        super().__init__()
        self.root = root.resolve()
        self.work_dir = work_dir
        self.extra_config = extra_config

    @property
    def url(self) -> str:
        """The base URL, with a trailing slash."""
        return f"http://127.0.0.1:{self.port}/"

    @property
    def access_log(self) -> Path:
        return self.work_dir / "access.log"

    @property
    def error_log(self) -> Path:
        return self.work_dir / "error.log"

    @property
    def log_path(self) -> Path:
        return self.error_log

    def _config(self) -> str:
        # Running as root, nginx would switch its workers to an unprivileged user that cannot
        # read pytest's private temporary directories; the workers keep our identity instead.
        user = "user root;" if os.geteuid() == 0 else ""
        temp = self.work_dir / "tmp"
        return f"""
{user}
daemon off;
worker_processes 1;
pid {self.work_dir / "nginx.pid"};
error_log {self.error_log} info;
events {{ worker_connections 64; }}
http {{
    types {{ application/json json; }}
    default_type application/octet-stream;
    log_format berth "{_LOG_FORMAT}";
    access_log {self.access_log} berth;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    sendfile on;
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
        {self.extra_config}
    }}
}}
"""

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        (self.work_dir / "tmp").mkdir(exist_ok=True)
        config = self.work_dir / "nginx.conf"
        config.write_text(self._config())
        return subprocess.Popen(
            # -e: the startup error log, before the configuration's own is opened.
            [
                find_tool("nginx"),
                "-p",
                str(self.work_dir),
                "-e",
                str(self.error_log),
                "-c",
                str(config),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def log_lines(self) -> list[str]:
        try:
            return self.access_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def requests(self) -> list[Request]:
        """The access log parsed, oldest first."""
        parsed: list[Request] = []
        for line in self.log_lines():
            status, body, request, range_ = line.split("\t")
            parsed.append(
                Request(int(status), int(body), request, None if range_ == "-" else range_)
            )
        return parsed
