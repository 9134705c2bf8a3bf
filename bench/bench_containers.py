"""Measure containerhost as a container host: idle footprint, and power-on to a service answering.

    .venv/bin/python -m bench.bench_containers [--boots 3]

Builds containerhost with the test web server's image preloaded (tests/containers.py), boots it
under QEMU, and prints:
- the idle footprint after the first boot (no containers): used memory (MemTotal - MemAvailable
  from /proc/meminfo, and `free`'s "used"), processes (userspace, and with kernel threads);
- the same with the quadlet service running;
- for each power-on after the quadlet files are in place: seconds from QEMU's start until the
  container answers HTTP on its port (forwarded to the host, so SSH plays no part), and when
  web.service became active by the guest's clock (since the kernel started).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.table import print_table
from builder.config import load_image
from builder.image import build_image
from qemu import VM, VMConfig
from qemu.vm import free_port
from tests.support.containers import PORT, httpd_archive, install_web_service, web_answers
from updater.release.version import Version

REPO = Path(__file__).resolve().parent.parent
MB = 1e6
# Let first-boot jobs (key generation, STATE growth, timers' first runs) finish before measuring.
SETTLE_SECONDS = 30


def footprint(vm: VM) -> tuple[int, int, int, int]:
    """(used bytes per MemAvailable, used bytes per `free`, userspace processes, all processes)."""
    vm.ssh("systemctl is-system-running --wait", check=False, timeout=600)
    time.sleep(SETTLE_SECONDS)
    meminfo = dict(
        (line.split(":")[0], int(line.split()[1]) * 1024)
        for line in vm.ssh_output("cat /proc/meminfo").splitlines()
    )
    used = meminfo["MemTotal"] - meminfo["MemAvailable"]
    free_used = int(vm.ssh_output("free -b | awk '/^Mem:/ {print $3}'"))
    # Kernel threads are kthreadd (pid 2) and its children.
    user = int(vm.ssh_output("ps --no-headers -N --ppid 2 -p 2 | wc -l")) - 1  # minus ps itself
    everything = int(vm.ssh_output("ps --no-headers -e | wc -l")) - 1
    return used, free_used, user, everything


def until_answers(url: str, started: float, vm: VM, timeout: float = 900.0) -> float:
    """Seconds from `started` until `url` answers 200."""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        if not vm.running or time.monotonic() - started > timeout:
            raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=3, help="power-ons timed with the service")
    args = parser.parse_args()

    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="berth-bench-containers-") as tmp:
        work = Path(tmp)
        archive = work / "httpd.tar"
        archive.write_bytes(httpd_archive(work))
        config = dataclasses.replace(
            load_image("containerhost", REPO / "images"), preload=(archive,)
        )
        version = Version(9000, int(time.time()) % 100000, 0)
        built = build_image(config, version, REPO, out_dir=work / "out")

        host_port = free_port()
        vm_config = VMConfig(
            disk=built.output / "disk.qcow2",
            disk_size="8G",
            work_dir=work / "vm",
            port_forwards=((host_port, PORT),),
        )
        url = f"http://127.0.0.1:{host_port}/"
        with VM(vm_config) as vm:  # entering starts it
            ssh_seconds = vm.wait_for_ssh(timeout=900)
            rows.append(("first boot: power-on to SSH", f"{ssh_seconds:.1f} s", ""))
            idle = footprint(vm)
            install_web_service(vm, "bench\n")
            web_answers(vm)
            serving = footprint(vm)
            for label, (used, free_used, user, everything) in (
                ("idle after boot", idle),
                ("with the quadlet service", serving),
            ):
                rows.append(
                    (
                        f"{label}: used memory",
                        f"{used / MB:.0f} MB",
                        f"free: {free_used / MB:.0f} MB",
                    )
                )
                rows.append((f"{label}: processes", f"{user}", f"{everything} with kernel threads"))
            vm.shutdown()

            answers: list[float] = []
            active: list[float] = []
            for _ in range(args.boots):
                vm.start()
                started = time.monotonic()
                answers.append(until_answers(url, started, vm))
                vm.wait_for_ssh(timeout=900)
                usec = vm.ssh_output("systemctl show -P ActiveEnterTimestampMonotonic web.service")
                active.append(int(usec) / 1e6)
                vm.shutdown()
            rows.append(
                (
                    "power-on to quadlet service answering ("
                    + ", ".join(f"{s:.0f}" for s in answers)
                    + " s)",
                    f"{statistics.median(answers):.1f} s median",
                    "host clock, port forwarded",
                )
            )
            rows.append(
                (
                    "kernel start to web.service active, guest clock ("
                    + ", ".join(f"{s:.0f}" for s in active)
                    + " s)",
                    f"{statistics.median(active):.1f} s median",
                    "",
                )
            )

    print(f"\nBerth containerhost {version} under {vm.accel}, 2 vCPUs, 2048 MiB")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
