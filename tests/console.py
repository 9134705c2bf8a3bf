"""What guests printed on their serial consoles: boots, and faults no test asked for.

A VM test passes when the machine ends up where it should, and boot counting lets a machine
recover from a boot that crashed. A kernel fault on the way would then go unseen. Under TCG
(no KVM), a guest kernel sometimes trips over its own live code patching (an "Oops: int3" while
a static key flips, on a vCPU that still runs the patched bytes) and crashes; the boot counter
absorbs it and the scenario costs one boot more. The firmware, too, has once stayed silent after
a reset until the harness power-cycled the machine (`VM.recover_hung_reset`, which says so in
the log). `guest_faults` finds both in a serial log so the session can list them instead of
hiding them in the boot count.
"""

from __future__ import annotations

import re

from qemu.vm import HARNESS_MARK

# Linux prints this once per boot: counts boots (and failed boot attempts) in a serial log.
KERNEL_BANNER = "Linux version "
# The one panic tests cause on purpose: the release whose initrd cannot run (tests/e2e.py).
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
