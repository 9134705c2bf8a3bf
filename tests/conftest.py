"""Shared fixtures. VM tests share one built image per session: builds and boots cost minutes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder import publish as pub
from builder.config import load_image
from builder.image import BuildResult, build_image
from qemu import VM, VMConfig
from tests.etcd import EtcdServer
from tests.machine import FakeMachine, Site
from tests.servers import NginxServer

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"

# One version for the test image: fixed, so a second session reuses nothing stale by accident
# (the build always rebuilds the output; only the package cache is shared).
TEST_VERSION = os.environ.get("BERTH_TEST_VERSION", "1.0.0")


@pytest.fixture(scope="session")
def built_image() -> BuildResult:
    """The default image (containerhost), built once per test session."""
    from updater.release.version import Version

    config = load_image("containerhost", REPO / "images")
    # BERTH_TEST_OUT: another output directory, so that two test sessions at once do not
    # replace the disk images each other's VMs are booted from.
    out = Path(os.environ["BERTH_TEST_OUT"]) if os.environ.get("BERTH_TEST_OUT") else None
    return build_image(config, Version.parse(TEST_VERSION), REPO, out_dir=out)


@pytest.fixture
def artifacts(request: pytest.FixtureRequest) -> Path:
    """Where a test keeps serial logs and journals; kept after the run for failed tests."""
    path: Path = ARTIFACTS / str(request.node.name).replace("/", "_")
    path.mkdir(parents=True, exist_ok=True)
    return path


def boot(disk: Path, workdir: Path, **options: object) -> VM:
    config = VMConfig(
        disk=disk,
        work_dir=workdir,
        serial_log=workdir / "serial.log",
        **options,  # type: ignore[arg-type]
    )
    return VM(config)


@pytest.fixture
def vm_factory(artifacts: Path) -> Iterator[list[VM]]:
    """Tests append the VMs they start; all are stopped even when the test fails."""
    vms: list[VM] = []
    yield vms
    for vm in vms:
        vm.close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """Signing keys and an empty TUF repository served by nginx on loopback."""
    pub.init_keys(tmp_path / "keys")
    (tmp_path / "repo").mkdir()
    with NginxServer(tmp_path / "repo", tmp_path / "nginx") as server:
        yield Site(tmp_path, server)


@pytest.fixture
def fake(tmp_path: Path, site: Site) -> FakeMachine:
    """A machine (GPT disk image, ESP, cmdline) booted into 1.0.0 from slot A."""
    return FakeMachine(tmp_path / "machine", site.release("1.0.0"))


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    """A real etcd on loopback, shared by a test module's tests (each uses its own groups)."""
    with EtcdServer() as server:
        yield server


# Serial logs grow across sessions (a machine started again appends): the sizes they had when
# this session started, so that only what it added is read at the end.
_SERIAL_AT_START: dict[Path, int] = {}


def _serial_logs() -> list[Path]:
    return sorted(ARTIFACTS.glob("*/*/serial.log"))


def pytest_sessionstart(session: pytest.Session) -> None:
    for log in _serial_logs():
        _SERIAL_AT_START[log] = log.stat().st_size


def _guest_faults() -> list[str]:
    """Guest faults no test asked for, in this session's serial logs (tests/console.py)."""
    from tests.console import guest_faults

    faults = []
    for log in _serial_logs():
        with log.open("rb") as f:
            f.seek(_SERIAL_AT_START.get(log, 0))
            text = f.read().decode(errors="replace")
        where = f"{log.parent.parent.name}/{log.parent.name}"
        faults += [f"{where}: {fault}" for fault in guest_faults(text)]
    return faults


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The end-to-end scenarios' table (tests/e2e.py): case, boots, seconds, outcome; then the
    guest faults that boot counting or the harness's power-cycle may have absorbed."""
    from tests.e2e import summary_table

    lines = summary_table()
    if lines:
        terminalreporter.section("end-to-end update scenarios")
        for line in lines:
            terminalreporter.write_line(line)
    faults = _guest_faults()
    if faults:
        terminalreporter.section("guest faults no test asked for")
        for line in faults:
            terminalreporter.write_line(line)
