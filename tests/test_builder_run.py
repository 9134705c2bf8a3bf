"""builder/run.py: image tools see a fixed environment, never the build host's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.run import TOOL_ENV, find_tool, run

FIXED = [
    "LANG=C.UTF-8",
    "LC_ALL=C.UTF-8",
    "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
    "TZ=UTC",
]


@pytest.fixture
def host_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """A build host whose shell would change the image if tools saw its environment."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    monkeypatch.setenv("TAR_OPTIONS", "--owner=1000")
    monkeypatch.setenv("ZSTD_CLEVEL", "19")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")


@pytest.fixture
def fresh_lookup() -> Iterator[None]:
    find_tool.cache_clear()
    yield
    find_tool.cache_clear()


def env_of(env: dict[str, str] | None = None) -> list[str]:
    return sorted(run(["env"], capture=True, env=env).stdout.decode().splitlines())


@pytest.mark.usefixtures("host_shell")
def test_tools_see_only_the_fixed_environment() -> None:
    assert env_of() == FIXED
    assert sorted(f"{k}={v}" for k, v in TOOL_ENV.items()) == FIXED


@pytest.mark.usefixtures("host_shell")
def test_a_caller_adds_what_its_tool_needs() -> None:
    assert env_of({"SOURCE_DATE_EPOCH": "0", "MTOOLS_SKIP_CHECK": "1"}) == sorted(
        [*FIXED, "SOURCE_DATE_EPOCH=0", "MTOOLS_SKIP_CHECK=1"]
    )


@pytest.mark.usefixtures("host_shell")
def test_the_host_time_zone_does_not_reach_a_tool() -> None:
    # mtools writes FAT timestamps in local time: with the host's TZ the ESP would differ.
    assert run(["date", "-d", "@0", "+%H:%M"], capture=True).stdout == b"00:00\n"


@pytest.mark.usefixtures("fresh_lookup")
def test_host_tools_are_found_on_the_host_path_and_run_with_the_fixed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "berth-host-env").symlink_to("/usr/bin/env")
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert find_tool("berth-host-env") == str(tmp_path / "berth-host-env")
    # Run by that absolute path, and what it starts in turn is looked up in the fixed PATH.
    seen = run(["berth-host-env"], capture=True).stdout.decode().splitlines()
    assert "PATH=/usr/sbin:/usr/bin:/sbin:/bin" in seen
