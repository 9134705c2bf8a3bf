"""The end-to-end update harness: releases built and published by the project's own code, served
by nginx on the host's loopback, installed by the daemon on machines booted under QEMU.

The guest reaches the host's loopback at 10.0.2.2 through QEMU's user network. Every machine
boots from a copy-on-write overlay of the session's built image (1.0.0), so machines start
identical and the image stays pristine. Power cuts are `VM.kill()` (SIGKILL to QEMU: whatever
the guest had not flushed is lost) followed by `VM.start()` on the same overlay and NVRAM.

Each scenario records one `Outcome` (case, boots, seconds, outcome); the session prints them as
a table at its end (`pytest_terminal_summary` below).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from builder import publish as pub
from builder.config import load_image
from builder.image import BuildResult, build_image
from qemu import VM, Firmware, VMConfig
from qemu.vm import OVMF_VARS
from tests.support import REPO, console
from tests.support.servers import NginxServer
from updater.release.version import Version

GUEST_HOST = "10.0.2.2"  # the host's loopback as QEMU's user network shows it to the guest
DISK_SIZE = "8G"
MARKER = "/usr/lib/berth/e2e-marker"
# A kernel command-line word that makes the initrd unusable: the kernel cannot run it, cannot
# mount root= itself, and panics; panic=10 (images/base.toml) then reboots.
PANIC_WORD = "rdinit=/berth-e2e-no-such-init"


@dataclass(frozen=True)
class Outcome:
    case: str
    boots: int
    seconds: float
    outcome: str


OUTCOMES: list[Outcome] = []


def record(case: str, boots: int, seconds: float, outcome: str) -> None:
    """Print the scenario's summary line now and keep it for the session's table."""
    result = Outcome(case, boots, seconds, outcome)
    OUTCOMES.append(result)
    print(f"\nE2E {case}: boots={boots} seconds={seconds:.0f} outcome={outcome}", flush=True)


def summary_table() -> list[str]:
    if not OUTCOMES:
        return []
    width = max(len(o.case) for o in OUTCOMES)
    lines = [f"{'case':<{width}}  {'boots':>5}  {'seconds':>7}  outcome"]
    lines += [f"{o.case:<{width}}  {o.boots:>5}  {o.seconds:>7.0f}  {o.outcome}" for o in OUTCOMES]
    return lines


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The end-to-end scenarios' table: case, boots, seconds, outcome."""
    console.write_section(terminalreporter, "end-to-end update scenarios", summary_table())


def build_release(
    base: BuildResult,
    version: str,
    out_dir: Path,
    work: Path,
    *,
    marker: str | None = None,
    cmdline: tuple[str, ...] = (),
    packages: tuple[str, ...] = (),
    files: tuple[tuple[str, str], ...] = (),
    keys_dir: Path | None = None,
) -> BuildResult:
    """Another version of the session's image: same packages (the cache is reused) unless a
    scenario adds some, a marker file from an extra tree and extra kernel command-line words
    where a scenario needs them."""
    config = load_image("containerhost", REPO / "images")
    config = dataclasses.replace(
        config, cmdline=(*config.cmdline, *cmdline), packages=(*config.packages, *packages)
    )
    trees: list[Path] = []
    wanted = (*files, *(((MARKER, marker + "\n"),) if marker is not None else ()))
    if wanted:
        tree = work / f"tree-{version}"
        for name, text in wanted:
            path = tree / name.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        trees.append(tree)
    return build_image(
        config,
        Version.parse(version),
        REPO,
        out_dir=out_dir,
        extra_trees=tuple(trees),
        keys_dir=keys_dir,  # None: the repository's keys, which 1.0.0 was built with
    )


class Site:
    """A TUF repository signed with the keys the images embed, served by nginx on loopback."""

    def __init__(self, work: Path, extra_config: str = "") -> None:
        self.repo = work / "repo"
        self.repo.mkdir(parents=True)
        self.keys = REPO / "keys"  # the images' trust anchor comes from here
        self.server = NginxServer(self.repo, work / "nginx", extra_config)

    def __enter__(self) -> Site:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()

    @property
    def guest_url(self) -> str:
        return f"http://{GUEST_HOST}:{self.server.port}/"

    def publish(self, release: BuildResult) -> None:
        pub.publish(release.output, self.repo, self.keys, "stable", immediate=True)

    def pull(self, version: str) -> None:
        pub.pull(self.repo, self.keys, "stable", Version.parse(version))


class Machine:
    """One QEMU machine booted from an overlay of the session's image, with helpers that read
    like what an operator would check."""

    def __init__(
        self,
        image: BuildResult,
        work: Path,
        fw_cfg: tuple[tuple[str, Path], ...] = (),
        firmware: Firmware = Firmware.UEFI,
        ovmf_vars: Path = OVMF_VARS,
        tpm: Path | None = None,
        credentials: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.image = image
        self.vm = VM(
            VMConfig(
                disk=image.output / "disk.qcow2",
                disk_size=DISK_SIZE,
                work_dir=work,
                serial_log=work / "serial.log",
                fw_cfg=fw_cfg,  # a first-boot config (Ignition) where a scenario needs one
                # Secure Boot's firmware, in setup mode (OVMF_VARS) or with keys enrolled
                firmware=firmware,
                ovmf_vars=ovmf_vars,
                # swtpm's state directory: kept across this machine's power cycles
                tpm=tpm,
                # systemd credentials by SMBIOS, as a platform's provisioning would pass them
                credentials=credentials,
            )
        )
        self.started = time.monotonic()
        # The serial log of an earlier run in the same artifacts directory is appended to.
        self._serial_start = self.vm.serial_offset()

    # -- power ---------------------------------------------------------------------------------

    def start(self, timeout: float = 600) -> None:
        self.vm.start()
        self.vm.wait_for_ssh(timeout=timeout)

    def cut_power(self) -> None:
        self.vm.kill()

    def close(self) -> None:
        self.vm.close()

    def boots(self) -> int:
        """Kernel starts seen on this machine's console so far (failed attempts included)."""
        return console.boots(self.console())

    def console(self) -> str:
        """What this machine printed on its serial console (this run only)."""
        return self.vm.serial_text(self._serial_start)

    def seconds(self) -> float:
        return time.monotonic() - self.started

    # -- guest state ---------------------------------------------------------------------------

    def ssh(self, command: str, timeout: float = 120) -> str:
        return self.vm.ssh_output(command, timeout=timeout)

    def try_ssh(self, command: str, timeout: float = 30) -> str | None:
        """Output of `command`, or None while the guest does not answer (rebooting)."""
        if not self.vm.running:
            return None
        result = self.vm.ssh(command, check=False, timeout=timeout)
        if result.returncode != 0:
            return None
        return result.stdout.decode(errors="replace").strip()

    def version(self) -> str:
        return self.ssh(". /etc/os-release && echo $IMAGE_VERSION")

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = json.loads(self.ssh("berth-update status --json"))
        return status

    def entries(self) -> list[str]:
        return list(self.status()["boot_entries"])

    def journal(self, units: str = "-u berth-update -u berth-health") -> str:
        return self.ssh(f"journalctl -b --no-pager -o cat {units}")

    def configure(
        self,
        url: str,
        strategy: str = "immediate",
        restart: bool = True,
        reboot_delay: str | None = None,
    ) -> None:
        """The operator's /etc/berth/update.toml, flushed (a power cut must not lose it).
        `reboot_delay="0s"` where an install is quick: the SSH session that restarted the
        daemon may still count as a logged-in user, who would be given 10 minutes."""
        delay = "" if reboot_delay is None else f'reboot_delay = "{reboot_delay}"\n'
        self.ssh(
            "mkdir -p /etc/berth && cat > /etc/berth/update.toml <<'EOF'\n"
            f'[update]\nurl = "{url}"\nchannel = "stable"\nstrategy = "{strategy}"\n'
            f'interval = "1m"\n{delay}EOF\nsync'
        )
        if restart:  # the daemon checks at once instead of at its next interval
            self.ssh("systemctl restart berth-update.service")

    def wait_for(
        self, what: str, condition: Callable[[], bool], timeout: float, poll: float = 5
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if condition():
                    return
            except Exception:  # the guest is rebooting: ssh fails, JSON is empty, ...
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:.0f} s waiting for {what}; console:\n"
                    + self.vm.serial_tail(60)
                )
            if not self.vm.running:
                raise AssertionError(f"QEMU exited while waiting for {what}")
            self.vm.recover_hung_reset()
            time.sleep(poll)

    def wait_for_boot(self, version: str, old_boot_id: str, timeout: float = 900) -> None:
        """Until the guest answers SSH in a new boot running `version`."""

        def booted() -> bool:
            boot_id = self.try_ssh("cat /proc/sys/kernel/random/boot_id")
            return boot_id not in (None, old_boot_id) and self.version() == version

        self.wait_for(f"a new boot of {version}", booted, timeout)

    def wait_until_blessed(self, version: str, timeout: float = 600) -> None:
        """Until systemd-bless-boot blessed the entry and the daemon took it as current."""

        def blessed() -> bool:
            status = self.status()
            return (
                f"berth_{version}.efi" in status["boot_entries"]
                and status["pending"] is None
                and status["booted_version"] == version
            )

        self.wait_for(f"{version} to be blessed", blessed, timeout)

    def save_logs(self, artifacts: Path) -> None:
        """The agent's journal (all boots) beside the serial log, for a failed case."""
        text = self.try_ssh(
            "journalctl --no-pager -o short-monotonic -u berth-update -u berth-health"
        )
        if text is not None:
            (artifacts / "agent-journal.txt").write_text(text + "\n")
