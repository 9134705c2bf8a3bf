"""Measure the update agent: apply throughput against this machine's limits, and idle memory.

    .venv/bin/python -m bench.bench_apply [--size-mib 512] [--workdir DIR]

Prints a table: sha256 throughput (hashlib over an in-memory buffer, one stream: the reference),
the throughput of the one check apply makes of a root image alone (its verity block digests, in
child processes as in the agent, from memory: a ceiling for apply on this machine, set by its
cores; the whole-file sha256 is not computed for root.erofs, docs/updates.md says why), raw
sequential write throughput (O_DIRECT; to a new file for reference, and to the slot partition
the agent then writes), the agent's apply throughput (a random release published with
builder.publish, served by nginx on loopback, applied into a tests.support.machine.FakeMachine whose
disk image, made dense like a real disk, is attached as a loop device with partitions, so the
agent takes the block-device path it takes on a real machine: download, slot write, hashing and
verification included) with its ratio to the sha256 rate (target >= 0.6) and to the slot's
raw write, where that time went, and the daemon's resident memory once idle (target <= 30 MB),
measured on a real `Daemon` in a child process that reports "idle" over a real $NOTIFY_SOCKET:
once on a machine where the release is already installed, once on a machine where that daemon
applied it first (what a machine waiting for kured holds).

Runs as root (losetup). Compare figures from one run only: other load on the machine moves all
of them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import mmap
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.table import print_table
from updater.update.machine import Machine

if TYPE_CHECKING:  # the daemon child must not pay for the test helpers' imports
    from tests.support import machine as tm

MiB = 1 << 20
MB = 1e6
REPO = Path(__file__).resolve().parent.parent


def sha256_rate(size: int) -> float:
    block = os.urandom(4 * MiB)
    digest = hashlib.sha256()
    start = time.perf_counter()
    for _ in range(size // len(block)):
        digest.update(block)
    return size / (time.perf_counter() - start)


def hashing_rate(size: int) -> tuple[float, int]:
    """The one check apply makes of a root image, alone: the verity digests of its blocks, as
    the agent computes them (updater.disk.hashers: child processes, 8 jobs of 1 MiB in flight),
    from memory. No network, no disk. Also the number of children."""
    from collections import deque

    from updater.disk import hashers

    data = memoryview(os.urandom(4 * MiB) * (size // (4 * MiB)))
    with hashers.HashProcesses(os.urandom(32)) as processes:
        waiting: deque[hashers.Job] = deque()
        start = time.perf_counter()
        for at in range(0, len(data), MiB):
            if len(waiting) >= 8:
                waiting.popleft().result()
            waiting.append(processes.submit(data[at : at + MiB]))
        while waiting:
            waiting.popleft().result()
        elapsed = time.perf_counter() - start
    return len(data) / elapsed, hashers.process_count()


def raw_write_rate(path: Path, size: int) -> tuple[float, str]:
    """Sequential write of `size` bytes, fsynced; O_DIRECT skips the page cache when allowed.
    A regular file is created (and removed); a block device is written from its start."""
    block = mmap.mmap(-1, 4 * MiB)  # page-aligned, as O_DIRECT needs
    block.write(os.urandom(4 * MiB))
    device = path.is_block_device()
    flags = os.O_WRONLY if device else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        fd = os.open(path, flags | os.O_DIRECT, 0o600)
        how = "O_DIRECT"
    except OSError:
        fd = os.open(path, flags, 0o600)
        how = "write+fsync"
    try:
        start = time.perf_counter()
        for _ in range(size // len(block)):
            os.write(fd, block)
        os.fsync(fd)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
        if not device:
            path.unlink()
    return size / elapsed, how


@contextlib.contextmanager
def loop_device(image: Path) -> Iterator[Path]:
    """`image` attached as a loop device whose partitions have kernel nodes, as a real disk has.

    Direct I/O to the backing file, so that the device's own page cache is the only one, like a
    disk's.
    """
    from builder.run import run

    out = run(["losetup", "--find", "--show", "--partscan", "--direct-io=on", image], capture=True)
    device = Path(out.stdout.decode().strip())
    try:
        if not list(Path("/sys/class/block", device.name).glob(f"{device.name}p*")):
            run(["partx", "--add", device])  # partscan does not always run in a container
        yield device
    finally:
        run(["losetup", "--detach", device])


class Phases:
    """Wall time spent in named agent functions during apply, by wrapping them."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, attr: str, name: Callable[..., str]) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[name(*args, **kwargs)] += time.perf_counter() - start

        setattr(owner, attr, timed)
        self._undo.append(lambda: setattr(owner, attr, original))

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()


def _watch(phases: Phases) -> None:
    from updater.disk import verity
    from updater.update import fetch

    phases.wrap(
        fetch,
        "stream_to",
        lambda url, *a, **k: "stream " + url.rsplit("/", 1)[-1].split(".", 1)[-1],
    )
    phases.wrap(os, "fsync", lambda *a, **k: "fsync (all files, inside the above)")
    phases.wrap(verity, "check_tree", lambda *a, **k: "check the verity tree")


def _dense(fake: tm.FakeMachine) -> None:
    """A real disk has every block: a sparse image would have the file system allocate each one
    on the first write and charge that to the agent."""
    from builder.run import run

    dense = fake.disk.with_name("dense.raw")
    run(["cp", "--sparse=never", fake.disk, dense])
    dense.replace(fake.disk)


@dataclass(frozen=True)
class Run:
    seconds: float
    cpu: float  # CPU seconds of the agent and the children it waited for (the hashers)
    server_cpu: float  # of nginx (master and workers) meanwhile
    phases: Phases


def apply_rate(work: Path, size: int, runs: int) -> tuple[list[Run], int, float, str, str]:
    """Apply a `size`-byte release on `runs` machines in turn: each run; the bytes applied; the
    raw write speed of the slot partition it goes to; the VmRSS of a daemon idle on such a
    machine; then that of a daemon idle after it applied the release itself, on one more
    machine (what a machine waiting for its reboot holds)."""
    from builder import publish as pub
    from tests.support import machine as tm
    from tests.support.servers import NginxServer
    from updater.agent import Agent
    from updater.disk import slots

    # The fake machine's slots must hold the release (a sparse disk image file).
    tm.SLOT_DATA = size + 16 * MiB
    tm.SLOT_VERITY = size // 64 + 16 * MiB
    pub.init_keys(work / "keys")
    (work / "repo").mkdir()
    installed = tm.make_verity_release(work / "out-installed", "1.0.0")
    fakes = [tm.FakeMachine(work / f"machine-{k}", installed) for k in range(runs)]
    second = tm.FakeMachine(work / "machine-daemon", installed)
    release = tm.make_verity_release(work / "out-new", "1.1.0", data_size=size)
    pub.publish(release, work / "repo", work / "keys", "stable", immediate=True)
    for fake in [*fakes, second]:
        _dense(fake)
    os.sync()  # the copy's writeback must not run during the measurements
    server = NginxServer(work / "repo", work / "nginx").start()
    measured = []
    raw = 0.0
    try:
        site = tm.Site(work, server)
        for fake in fakes:
            with loop_device(fake.disk) as device:
                if not raw:
                    with device.open("rb") as f:
                        slot_b = slots.read_slots(f)[1]
                    raw, _ = raw_write_rate(slots.partition_path(device, slot_b.data_number), size)
                machine = replace(fake.machine(work / "keys/root.json"), disk=device)
                agent = Agent(machine, site.config())
                phases = Phases()
                _watch(phases)
                assert server.pid is not None
                try:
                    cpu, server_cpu = _cpu(), _tree_cpu(server.pid)
                    start = time.perf_counter()
                    applied = agent.apply()
                    elapsed = time.perf_counter() - start
                    cpu, server_cpu = _cpu() - cpu, _tree_cpu(server.pid) - server_cpu
                finally:
                    phases.restore()
            assert str(applied.version) == "1.1.0"
            measured.append(Run(elapsed, cpu, server_cpu, phases))
        total = sum((release / n).stat().st_size for n in ("root.erofs", "root.verity", "uki.efi"))
        _idle_rss_setup(work, fakes[0], server.url)
        rss = idle_rss(work)
        _idle_rss_setup(work, second, server.url)
        rss_applied = idle_rss(work)
    finally:
        server.stop()
    return measured, total, raw, rss, rss_applied


def _cpu() -> float:
    """CPU seconds used so far by this process and the children it has waited for."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _tree_cpu(pid: int) -> float:
    """CPU seconds used so far by process `pid` and its direct children (/proc)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(stat.parent.name) == pid or int(fields[1]) == pid:  # fields[1]: the parent
            total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def _idle_rss_setup(work: Path, fake: tm.FakeMachine, url: str) -> None:
    (work / "update.toml").write_text(
        f'[update]\nurl = "{url}"\nchannel = "stable"\nstrategy = "off"\ninterval = "1h"\n'
    )
    (work / "daemon.json").write_text(json.dumps({"base": str(fake.base)}))


def idle_rss(work: Path) -> str:
    """Start a daemon child with $NOTIFY_SOCKET; read its VmRSS once it reports idle."""
    address = work / "notify"
    address.unlink(missing_ok=True)  # an earlier child's
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(address))
        s.settimeout(60)
        child = subprocess.Popen(
            [sys.executable, "-m", "bench.bench_apply", "--daemon-child", str(work)],
            cwd=REPO,
            env={**os.environ, "NOTIFY_SOCKET": str(address)},
        )
        try:
            while not s.recv(4096).decode().startswith("STATUS=idle"):
                pass
            time.sleep(1.0)
            status = Path(f"/proc/{child.pid}/status").read_text()
            return next(
                line.split(":", 1)[1].strip()
                for line in status.splitlines()
                if line.startswith("VmRSS")
            )
        finally:
            child.terminate()
            child.wait()


def daemon_child(work: Path) -> None:
    """The daemon as berth-update.service runs it, pointed at the fake machine's paths."""
    import logging

    from updater.service.daemon import ConfigPaths, Daemon, initial_config

    logging.basicConfig(level=logging.INFO, format="daemon: %(message)s")
    spec = json.loads((work / "daemon.json").read_text())
    base = Path(spec["base"])
    machine = _machine(base, base / "root", work)
    paths = ConfigPaths(work / "update.toml", work / "no-override.toml")
    Daemon(machine, initial_config(paths), paths=paths).run()


def _machine(base: Path, root: Path, work: Path) -> Machine:
    return Machine(
        disk=base / "disk.raw",
        esp=base / "esp",
        var=root / "var",
        cmdline=root / "proc/cmdline",
        loader_entry=root / "efivars/LoaderEntrySelected",
        os_release=root / "etc/os-release",
        machine_id=root / "etc/machine-id",
        trusted_root=work / "keys/root.json",
        boot_id=root / "proc/boot_id",
        reboot_required=root / "run/reboot-required",
        arch="x86_64",  # the fake machine's architecture (tests.support.machine.ARCH)
    )


def _outer(phases: Phases) -> float:
    """Time in the wrapped functions that do not nest inside others."""
    return sum(t for name, t in phases.seconds.items() if not name.startswith("fsync"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=512)
    p.add_argument("--runs", type=int, default=3, help="applies, each on its own machine")
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    p.add_argument("--daemon-child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.daemon_child:
        daemon_child(args.daemon_child)
        return 0
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-apply-") as tmp:
        work = Path(tmp)
        sha = sha256_rate(size)
        hashing, children = hashing_rate(size)
        raw_file, how = raw_write_rate(work / "raw", size)
        runs, applied, raw, rss, rss_applied = apply_rate(work, size, args.runs)
    run = sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]  # the median
    rate, total, phases = applied / run.seconds, run.seconds, run.phases
    cores = os.cpu_count() or 1
    rows = [
        ("sha256 (hashlib, in memory)", f"{sha / MB:.0f} MB/s", ""),
        (
            f"the check alone (verity digests, {children} processes, in memory)",
            f"{hashing / MB:.0f} MB/s",
            f"ratio {hashing / sha:.2f}: apply's ceiling here",
        ),
        (f"raw sequential write, a new file ({how})", f"{raw_file / MB:.0f} MB/s", "for reference"),
        ("raw sequential write, slot B (O_DIRECT)", f"{raw / MB:.0f} MB/s", ""),
        (
            f"apply {args.size_mib} MiB (loopback, verify incl.), median of {len(runs)}",
            f"{rate / MB:.0f} MB/s",
            f"ratio {rate / sha:.2f} of sha256 (target >= 0.60); {rate / raw:.2f} of the write",
        ),
        (
            "  each run",
            " ".join(f"{applied / r.seconds / MB:.0f}" for r in runs),
            "MB/s",
        ),
        (
            "  CPU of the agent and its hashers",
            f"{run.cpu / (applied / 1e9):.2f} s/GB",
            f"{run.cpu / run.seconds:.2f} of {cores} cores busy for it",
        ),
        (
            "  CPU of nginx meanwhile",
            f"{run.server_cpu / (applied / 1e9):.2f} s/GB",
            f"{run.server_cpu / run.seconds:.2f} of {cores} cores (loopback: the server shares "
            "them)",
        ),
    ]
    rows += [(f"  {name}", f"{t:.2f} s", "") for name, t in sorted(phases.seconds.items())]
    rows += [
        ("  rest (TUF, manifest, probes, GPT, ESP)", f"{total - _outer(phases):.2f} s", ""),
        ("daemon idle VmRSS", rss, "target <= 30 MB"),
        (f"  after applying {args.size_mib} MiB itself", rss_applied, "target <= 30 MB"),
    ]
    print_table(rows, 10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
