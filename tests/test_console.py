"""tests/support/console.py on serial output as the guests print it (lines from real TCG runs)."""

from __future__ import annotations

from tests.support.console import boots, guest_faults

FIRMWARE = 'BdsDxe: starting Boot0001 "UEFI Misc Device" from PciRoot(0x0)/Pci(0x3,0x0)\r\n'
BANNER = "[    0.000000] Linux version 6.12.118+deb13-amd64 (debian-kernel@lists.debian.org)\r\n"
CLEAN = "[\x1b[0;32m  OK  \x1b[0m] Reached target \x1b[0;1;39mmulti-user.target\x1b[0m.\r\n"
OOPS_THEN_PANIC = (
    "[   49.334520] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\r\n"
    "[   49.334766] CPU: 1 UID: 0 PID: 580 Comm: berth-update Not tainted 6.12.118+deb13-amd64\r\n"
    "[   49.334882] RIP: 0010:ip_local_deliver+0x5a/0x100\r\n"
    "[   49.344658] ------------[ cut here ]------------\r\n"
    "[   49.345033] RIP: 0010:kernel_fpu_begin_mask+0xdd/0x100\r\n"
    "[   49.867220] Kernel panic - not syncing: Fatal exception in interrupt\r\n"
)
DELIBERATE = (
    "[    2.992997] Kernel panic - not syncing: VFS: Unable to mount root fs on "
    "unknown-block(0,0)\r\n"
    "[    2.993315] CPU: 0 UID: 0 PID: 1 Comm: swapper/0 Not tainted 6.12.118+deb13-amd64\r\n"
)
OOPS_ONLY = (
    "[    1.883995] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\r\n"
    "[    1.884451] RIP: 0010:sched_clock_cpu+0x9/0x1d0\r\n"
    "[    1.886050] Oops: int3: 0000 [#2] PREEMPT SMP NOPTI\r\n"
)
OTHER_PANIC = (
    "[    5.100000] Kernel panic - not syncing: Attempted to kill init! exitcode=0x100\r\n"
)


def console(*boots_printed: str) -> str:
    return "".join(FIRMWARE + BANNER + text for text in boots_printed)


def test_a_clean_console_and_the_deliberate_panic_report_nothing() -> None:
    text = console(CLEAN, DELIBERATE, DELIBERATE, CLEAN)
    assert boots(text) == 4
    assert guest_faults(text) == []


def test_each_faulty_boot_is_named_with_its_first_fault_and_where_it_hit() -> None:
    text = console(CLEAN, OOPS_THEN_PANIC, CLEAN, OOPS_ONLY, OTHER_PANIC, DELIBERATE)
    assert guest_faults(text) == [
        "boot 2: Oops: int3: 0000 [#1] PREEMPT SMP NOPTI at ip_local_deliver+0x5a/0x100; "
        "then the kernel panicked",
        "boot 4: Oops: int3: 0000 [#1] PREEMPT SMP NOPTI at sched_clock_cpu+0x9/0x1d0",
        "boot 5: panic: Attempted to kill init! exitcode=0x100",
    ]


def test_an_oops_before_the_deliberate_panic_is_still_reported() -> None:
    text = console(OOPS_ONLY + DELIBERATE)
    assert guest_faults(text) == [
        "boot 1: Oops: int3: 0000 [#1] PREEMPT SMP NOPTI at sched_clock_cpu+0x9/0x1d0; "
        "then the kernel panicked"
    ]


def test_a_power_cycle_by_the_harness_is_reported_with_the_boot_it_ended() -> None:
    reset = "[   69.144919] reboot: machine restart\r\n"
    mark = "\nberth-harness: no console output for 123 s after the guest reset; power-cycled\n"
    text = console(CLEAN + reset, CLEAN + reset + mark, OOPS_ONLY)
    assert boots(text) == 3
    assert guest_faults(text) == [
        "boot 2: berth-harness: no console output for 123 s after the guest reset; power-cycled",
        "boot 3: Oops: int3: 0000 [#1] PREEMPT SMP NOPTI at sched_clock_cpu+0x9/0x1d0",
    ]
    # The kernel's own words are never taken for the harness's.
    assert guest_faults(console(CLEAN + "[ 1.0] berth-harness: in a kernel line\r\n")) == []
