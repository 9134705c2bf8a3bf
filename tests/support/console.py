"""What guests printed on their serial consoles: boots, and faults no test asked for.

A VM test passes when the machine ends up where it should, and boot counting lets a machine
recover from a boot that crashed. A kernel fault on the way would then go unseen. Under TCG
(no KVM), a guest kernel sometimes trips over its own live code patching (an "Oops: int3" while
a static key flips, on a vCPU that still runs the patched bytes) and crashes; the boot counter
absorbs it and the scenario costs one boot more. The firmware, too, has once stayed silent after
a reset until the harness power-cycled the machine (`VM.recover_hung_reset`, which says so in
the log). `guest_faults` finds both in a serial log, and the session lists them at its end
(under "guest faults no test asked for") instead of hiding them in the boot count.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qemu.vm import HARNESS_MARK
from tests.support.vms import ARTIFACTS

# Linux prints this once per boot: counts boots (and failed boot attempts) in a serial log.
KERNEL_BANNER = "Linux version "
# The one panic tests cause on purpose: the release whose initrd cannot run (tests/support/e2e.py).
DELIBERATE_PANIC = "VFS: Unable to mount root fs"

_OOPS = re.compile(r"\bOops: ([^\r\n]*)")
_PANIC = re.compile(r"Kernel panic - not syncing: ([^\r\n]*)")
_RIP = re.compile(r"RIP: [0-9a-f]{4}:(\S+)")


def boots(console: str) -> int:
    """Kernel starts on this console (failed attempts included)."""
    return console.count(KERNEL_BANNER)


def guest_faults(console: str) -> list[str]:
    """A line for each boot in which the kernel oopsed, or panicked for a reason other than the
    deliberate one (the boot's number, the first fault and the function it hit), and one for
    each time the harness had to power-cycle the machine after the boot's reset."""
    faults = []
    for number, boot in enumerate(console.split(KERNEL_BANNER)[1:], start=1):
        faults += _kernel_fault(number, boot)
        faults += [f"boot {number}: {line.strip()}" for line in _harness_lines(boot)]
    return faults


def _harness_lines(boot: str) -> list[str]:
    return [line for line in boot.splitlines() if line.startswith(HARNESS_MARK)]


def _kernel_fault(number: int, boot: str) -> list[str]:
    oops = _OOPS.search(boot)
    panic = _PANIC.search(boot)
    if panic is not None and DELIBERATE_PANIC in panic[1] and oops is None:
        return []
    first = oops or panic
    if first is None:
        return []
    what = f"Oops: {first[1].strip()}" if first is oops else f"panic: {first[1].strip()}"
    rip = _RIP.search(boot, first.end(), first.end() + 2000)  # in the fault's own report
    where = f" at {rip[1]}" if rip is not None else ""
    then = "; then the kernel panicked" if oops is not None and panic is not None else ""
    return [f"boot {number}: {what}{where}{then}"]


# Serial logs grow across sessions (a machine started again appends): the sizes they had when
# this session started, so that only what it added is read at the end.
_SERIAL_AT_START: dict[Path, int] = {}


def _serial_logs() -> list[Path]:
    return sorted(ARTIFACTS.glob("*/*/serial.log"))


def pytest_sessionstart(session: pytest.Session) -> None:
    for log in _serial_logs():
        _SERIAL_AT_START[log] = log.stat().st_size


def _session_faults() -> list[str]:
    """Guest faults no test asked for, in this session's serial logs."""
    faults = []
    for log in _serial_logs():
        with log.open("rb") as f:
            f.seek(_SERIAL_AT_START.get(log, 0))
            text = f.read().decode(errors="replace")
        where = f"{log.parent.parent.name}/{log.parent.name}"
        faults += [f"{where}: {fault}" for fault in guest_faults(text)]
    return faults


def write_section(reporter: pytest.TerminalReporter, title: str, lines: list[str]) -> None:
    """A section of the session's closing report, left out when it has nothing to say."""
    if lines:
        reporter.section(title)
        for line in lines:
            reporter.write_line(line)


# trylast: after the end-to-end scenarios' table (tests/support/e2e.py), whose boots these
# faults may have cost.
@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The guest faults that boot counting or the harness's power-cycle may have absorbed."""
    write_section(terminalreporter, "guest faults no test asked for", _session_faults())
