"""A real etcd (Debian's etcd-server) on loopback, for the reboot-lock tests.

One single-member cluster per use, on free ports, with its data directory in a private temporary
directory (on /dev/shm when there is one: etcd fsyncs every write, and a tmpfs makes that free,
which keeps fifty contending agents within seconds). `./build.py test` installs the package
(builder.run.HOST_TOOLS maps the `etcd` command to it).

    def test_x(etcd):          # the fixture below: one server per test module
        store = EtcdStore([etcd.url])
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from builder.run import find_tool
from qemu.vm import free_port
from tests.support.servers import ServerProcess


class EtcdServer(ServerProcess):
    name = "etcd"

    def __init__(self) -> None:
        super().__init__()
        shm = Path("/dev/shm")
        self.work_dir = Path(
            tempfile.mkdtemp(prefix="berth-etcd-", dir=shm if shm.is_dir() else None)
        )
        self._attempts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "etcd.log"

    def _spawn(self) -> subprocess.Popen[bytes]:
        self._attempts += 1
        peer_url = f"http://127.0.0.1:{free_port()}"
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                [
                    find_tool("etcd"),
                    "--name=test",
                    f"--data-dir={self.work_dir / f'data{self._attempts}'}",
                    f"--listen-client-urls={self.url}",
                    f"--advertise-client-urls={self.url}",
                    f"--listen-peer-urls={peer_url}",
                    f"--initial-advertise-peer-urls={peer_url}",
                    f"--initial-cluster=test={peer_url}",
                    "--log-level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def _ready(self) -> bool:
        with contextlib.suppress(requests.RequestException, ValueError):
            return bool(requests.get(self.url + "/health", timeout=1).json()["health"] == "true")
        return False

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.work_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    """A real etcd on loopback, shared by a test module's tests (each uses its own groups)."""
    with EtcdServer() as server:
        yield server
