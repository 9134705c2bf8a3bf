"""STATE encrypted with a TPM against STATE plain: first boot, /var throughput, container start.

    .venv/bin/python -m bench.bench_encryption [--image containerhost] [--rounds 1] [--mib 512]

Boots a copy of the built image (taken once, so that a build replacing out/<image>/latest meanwhile
changes nothing under the machines) from a fresh overlay twice per round: "encrypted" with a fresh
software TPM (swtpm, VMConfig.tpm), where the image puts STATE on LUKS2 at its first boot, and
"plain" without a TPM, where STATE stays ext4. Each machine is measured the same way, after
systemd reports the boot finished (first-boot jobs done): power-on to SSH; sequential write,
overwrite and read of a file on /var with O_DIRECT, caches dropped before each (the first write
allocates the overlay's clusters on the host, the overwrite does not, so both are shown); and
`podman run --rm` of a tiny image loaded from an archive made here (no registry is reachable),
once with caches dropped and then warm. It prints what /var sits on in each machine (the block
device stack and dm-crypt's cipher), so a reader sees that encryption was on in one and off in
the other, then the medians and the ratios encrypted / plain.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.bench_image import boot_seconds
from bench.table import print_table
from builder.run import run
from qemu import VM, VMError, resolve_disk
from tests.support.oci import oci_archive, static_hello

MB = 1e6
SETUPS = ("encrypted", "plain")
IMAGE = "localhost/berth/hello:1"
BENCH_FILE = "/var/tmp/berth-bench-encryption"
# Warm container starts after the cold one; their median is the figure.
WARM_STARTS = 3
_DD_SUMMARY = re.compile(r"^(\d+) bytes .* copied, ([0-9.]+) s", re.MULTILINE)


@dataclass(frozen=True)
class Storage:
    """What /var is on inside the guest."""

    source: str  # the mounted device, e.g. /dev/mapper/state or /dev/vda4
    stack: str  # lsblk's inverse tree: the device, then what it sits on
    crypt: bool  # a dm-crypt device is in the stack
    cipher: str  # dm-crypt's cipher per dmsetup, "" when plain or unknown
    tpm: bool  # the guest has a TPM (/dev/tpmrm0)

    def describe(self) -> str:
        crypt = f"dm-crypt {self.cipher or '(cipher unknown)'}" if self.crypt else "no dm-crypt"
        tpm = "TPM present" if self.tpm else "no TPM"
        return f"{self.stack}; {crypt}; {tpm}"


@dataclass(frozen=True)
class Figures:
    """One machine's measurements."""

    boot: float  # seconds from QEMU's start to SSH
    write: float  # MB/s, O_DIRECT, into newly allocated blocks
    overwrite: float  # MB/s, O_DIRECT, the same blocks again
    read: float  # MB/s, O_DIRECT, caches dropped
    container_cold: float  # seconds, `podman run --rm` with caches dropped
    container_warm: float  # seconds, median of WARM_STARTS more
    storage: Storage


# (label, Figures attribute, unit, decimals): the table's rows.
METRICS: tuple[tuple[str, str, str, int], ...] = (
    ("first boot to SSH", "boot", "s", 1),
    ("/var sequential write, new blocks", "write", "MB/s", 0),
    ("/var sequential overwrite", "overwrite", "MB/s", 0),
    ("/var sequential read, caches dropped", "read", "MB/s", 0),
    ("container start, caches dropped", "container_cold", "s", 2),
    (f"container start, warm (median of {WARM_STARTS})", "container_warm", "s", 2),
)


def dd_rate(output: str) -> float:
    """MB/s from dd's summary line: its byte count and seconds, not its rounded rate."""
    match = _DD_SUMMARY.search(output)
    if match is None:
        raise ValueError(f"no dd summary in: {output!r}")
    size, seconds = int(match.group(1)), float(match.group(2))
    return size / seconds / MB


def crypt_cipher(vm: VM, name: str) -> str:
    """dm-crypt's cipher of device `name`, from dmsetup or else cryptsetup; "" if neither says."""
    table = vm.ssh(f"dmsetup table {name}", check=False).stdout.decode(errors="replace").split()
    # start length crypt <cipher> <key> <iv offset> <device> <offset> ...
    if len(table) > 3 and table[2] == "crypt":
        return table[3]
    status = vm.ssh(f"cryptsetup status {name}", check=False).stdout.decode(errors="replace")
    match = re.search(r"^\s*cipher:\s*(\S+)", status, re.MULTILINE)
    return match.group(1) if match else ""


def var_storage(vm: VM) -> Storage:
    # A bind mount's source reads /dev/vda4[/var]: the device is before the bracket.
    source = vm.ssh_output("findmnt -no SOURCE -T /var").split("[")[0]
    # Raw (no tree drawing) and inverse: the device first, then each device it sits on.
    result = vm.ssh(f"lsblk -rsno NAME,TYPE,FSTYPE {source}", check=False)
    rows = [row.split() for row in result.stdout.decode(errors="replace").splitlines()]
    rows = [row for row in rows if row]
    stack = " <- ".join(f"{row[0]} ({', '.join(row[1:])})" for row in rows) or source
    crypts = [row[0] for row in rows if len(row) > 1 and row[1] == "crypt"]
    cipher = crypt_cipher(vm, crypts[0]) if crypts else ""
    tpm = vm.ssh("test -c /dev/tpmrm0", check=False).returncode == 0
    return Storage(source, stack, bool(crypts), cipher, tpm)


def var_throughput(vm: VM, mib: int) -> tuple[float, float, float]:
    """(write, overwrite, read) in MB/s of a `mib` MiB file on /var, bypassing the page cache."""
    drop = "sync && echo 3 > /proc/sys/vm/drop_caches"
    dd = f"LC_ALL=C dd bs=1M count={mib}"
    timeout = 60 + mib  # TCG manages tens of MB/s at worst
    try:
        write = vm.ssh_output(
            f"{drop} && {dd} if=/dev/zero of={BENCH_FILE} oflag=direct conv=fsync 2>&1",
            timeout=timeout,
        )
        overwrite = vm.ssh_output(
            f"{drop} && {dd} if=/dev/zero of={BENCH_FILE} oflag=direct conv=fsync,notrunc 2>&1",
            timeout=timeout,
        )
        read = vm.ssh_output(
            f"{drop} && {dd} if={BENCH_FILE} of=/dev/null iflag=direct 2>&1", timeout=timeout
        )
    finally:
        vm.ssh(f"rm -f {BENCH_FILE}", check=False)
    return dd_rate(write), dd_rate(overwrite), dd_rate(read)


def container_start(vm: VM, *, cold: bool) -> float:
    """Seconds `podman run --rm IMAGE` takes by the guest's clock."""
    drop = "sync && echo 3 > /proc/sys/vm/drop_caches && " if cold else ""
    script = (
        f"{drop}t0=$(date +%s%N) && podman run --rm {IMAGE} >/dev/null && t1=$(date +%s%N)"
        " && echo $(( (t1 - t0) / 1000 ))"
    )
    return int(vm.ssh_output(script, timeout=300)) / 1e6


def measure(vm: VM, archive: bytes, mib: int) -> tuple[Storage, tuple[float, ...]]:
    """Everything but the boot time, on a booted machine: /var's storage, then the figures.

    Each figure is printed as it is taken, so that a machine failing later still shows them.
    """
    vm.ssh("systemctl is-system-running --wait", check=False, timeout=900)
    storage = var_storage(vm)
    print(f"  /var: {storage.describe()}", flush=True)
    write, overwrite, read = var_throughput(vm, mib)
    print(f"  write {write:.0f}, overwrite {overwrite:.0f}, read {read:.0f} MB/s", flush=True)
    vm.ssh("cat > /var/tmp/hello.tar", input=archive)
    vm.ssh("podman load -q -i /var/tmp/hello.tar && rm /var/tmp/hello.tar", timeout=300)
    cold = container_start(vm, cold=True)
    warm_runs = [container_start(vm, cold=False) for _ in range(WARM_STARTS)]
    warm = statistics.median(warm_runs)
    every = ", ".join(f"{t:.2f}" for t in warm_runs)
    print(f"  container start {cold:.2f} s cold, then {every} s", flush=True)
    return storage, (write, overwrite, read, cold, warm)


def machine_figures(disk: Path, setup: str, archive: bytes, mib: int) -> Figures:
    """Boot a fresh machine in `setup` ("encrypted": a new TPM; "plain": none) and measure it."""
    seen: list[tuple[Storage, tuple[float, ...]]] = []

    def check(vm: VM) -> None:
        try:
            seen.append(measure(vm, archive, mib))
        except VMError as e:
            # The work dir and its serial log go with the VM: keep the console's last words.
            raise SystemExit(
                f"{setup} machine: {e}\n--- serial console ---\n{vm.serial_tail()}"
            ) from e

    print(f"{setup}: booting", flush=True)
    with tempfile.TemporaryDirectory(prefix="berth-bench-tpm-") as tmp:
        tpm = Path(tmp) / "tpm" if setup == "encrypted" else None
        seconds = boot_seconds(disk, check, tpm=tpm)
    storage, (write, overwrite, read, cold, warm) = seen[0]
    if setup == "plain" and (storage.crypt or storage.tpm):
        raise SystemExit(f"the plain machine has {storage.describe()}")
    return Figures(seconds, write, overwrite, read, cold, warm, storage)


def hello_archive() -> bytes:
    """The oci-archive of IMAGE: a static program that prints a line (needs the host's gcc)."""
    with tempfile.TemporaryDirectory(prefix="berth-bench-hello-") as tmp:
        files = {"hello": (static_hello(Path(tmp)), 0o755)}
    return oci_archive(files, ["/hello", "from", "berth"], IMAGE.removeprefix("localhost/"))


def result_rows(runs: Mapping[str, Sequence[Figures]]) -> list[tuple[str, str, str]]:
    """The table: per metric the median of each setup (every round in the note), then the ratio."""
    rows: list[tuple[str, str, str]] = []
    for label, attribute, unit, decimals in METRICS:
        medians: dict[str, float] = {}
        for setup in SETUPS:
            values = [getattr(figures, attribute) for figures in runs[setup]]
            medians[setup] = statistics.median(values)
            every = ", ".join(f"{v:.{decimals}f}" for v in values) if len(values) > 1 else ""
            value = f"{medians[setup]:.{decimals}f} {unit}"
            rows.append((f"{label}, {setup}", value, every))
        ratio = medians["encrypted"] / medians["plain"]
        rows.append((f"{label}, encrypted / plain", f"{ratio:.2f}", ""))
    return rows


def storage_lines(runs: Mapping[str, Sequence[Figures]]) -> list[str]:
    lines = []
    for setup in SETUPS:
        for index, figures in enumerate(runs[setup], start=1):
            lines.append(f"/var, {setup} (round {index}): {figures.storage.describe()}")
        if setup == "encrypted" and not all(f.storage.crypt for f in runs[setup]):
            lines.append(
                "WARNING: /var was not on dm-crypt with a TPM: the image did not encrypt STATE, "
                "so the ratios compare plain with plain"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="containerhost")
    parser.add_argument("--rounds", type=int, default=1, help="machines booted per setup")
    parser.add_argument("--mib", type=int, default=512, help="size of the file dd writes")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.mib < 1:
        parser.error("--rounds and --mib must be at least 1")
    disk = resolve_disk(args.image)
    archive = hello_archive()
    runs: dict[str, list[Figures]] = {setup: [] for setup in SETUPS}
    with tempfile.TemporaryDirectory(prefix="berth-bench-disk-") as tmp:
        copy = Path(tmp) / disk.name
        run(["cp", "--sparse=always", disk, copy])
        for _ in range(args.rounds):
            for setup in SETUPS:
                result = machine_figures(copy, setup, archive, args.mib)
                runs[setup].append(result)
                print(f"{setup}: first boot to SSH {result.boot:.1f} s", flush=True)
    print(f"\nBerth {args.image} ({disk}), {args.mib} MiB through dd, {args.rounds} round(s)")
    for line in storage_lines(runs):
        print(line)
    print_table(result_rows(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
