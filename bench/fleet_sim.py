"""Simulate a fleet rolling out releases under reboot coordination, on a simulated clock.

    .venv/bin/python -m bench.fleet_sim [--machines 10000] [--groups 100] [--slots 2]
                                        [--second-at 18] [--seed 1] [--no-plot]

Every machine runs the agent's real decisions: its rollout seed from its machine id
(release.channel.machine_seed), the release it would install (select_candidate against a channel
whose releases carry the default waves, channel.default_waves as builder.publish uses them), and
the reboot gate of the etcd-lock strategy (reboot.gate.LockGate on reboot.semaphore's
SemaphoreClient: airlock's semaphore, compare-and-swap, its retry backoff). The semaphore lives in
semaphore.MemoryStore, the in-memory store with etcd's compare-and-swap contract, so the code path
is the one the etcd tests run against a real etcd; only the network is left out.

The daemon's loop is mirrored: a check every hour with ±10% jitter, a download, the gate; a
refused gate is asked again after its retry delay (or at the next check, which may find a newer
release); a granted one reboots (boot and health check take minutes), the new version is blessed
and the slot is given back (steady-state). The same fleet is then run with `immediate` for
comparison.

Prints a table (time to 50 / 99 / 100 % of the fleet on each release, the most concurrent
reboots, per group and fleet-wide) and draws bench/out/fleet_sim.png: versions across the fleet
over time and reboots in progress. matplotlib is installed into the running venv on first use; it
is not a dependency of Berth.
"""

from __future__ import annotations

import argparse
import heapq
import importlib
import json
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from updater.reboot.gate import Immediate, LockGate, RebootGate
from updater.reboot.semaphore import MemoryStore, SemaphoreClient
from updater.release.channel import (
    ChannelManifest,
    Release,
    default_waves,
    machine_seed,
    select_candidate,
)
from updater.release.identity import lock_id
from updater.release.version import Version
from updater.service.daemon import JITTER

OUT = Path(__file__).resolve().parent / "out"
T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
INTERVAL = 3600.0
SAMPLE = 600.0  # seconds between points of the plot
BASE = Version(1, 0, 0)
TARGETS = {
    "root.erofs": "x/root.erofs",
    "root.verity": "x/root.verity",
    "uki.efi": "x/uki.efi",
    "manifest.json": "x/manifest.json",
}


def release(version: Version, published: datetime) -> Release:
    return Release(
        image="containerhost",
        arch="x86_64",
        version=version,
        roothash="0" * 64,
        targets=TARGETS,
        waves=default_waves(published),
    )


@dataclass
class Machine:
    index: int
    seed: int
    holder: str
    gate: RebootGate
    group: str
    version: Version = BASE
    pending: Version | None = None
    holding: bool = False  # between a granted gate and the release after blessing


@dataclass
class Result:
    label: str
    reached: dict[Version, dict[int, float]]  # release -> percent -> hours after its publish
    max_reboots: int
    max_per_group: int
    samples: list[tuple[float, Counter[Version], int]] = field(default_factory=list)
    seconds: float = 0.0
    events: int = 0
    downloads: int = 0  # installs: each one fetches a release from the repository


def simulate(args: argparse.Namespace, locked: bool) -> Result:
    rng = random.Random(args.seed)
    publish = [(Version(1, 1, 0), 0.0)]
    if args.second_at:
        publish.append((Version(1, 2, 0), args.second_at * 3600.0))
    store = MemoryStore()
    machines: list[Machine] = []
    for i in range(args.machines):
        machine_id = f"{rng.getrandbits(128):032x}"
        group = f"g{i % args.groups}"
        holder = lock_id(machine_id)
        gate: RebootGate = (
            LockGate(semaphore=SemaphoreClient(store, group, args.slots), holder=holder)
            if locked
            else Immediate()
        )
        machines.append(Machine(i, machine_seed(machine_id), holder, gate, group))

    events: list[tuple[float, int, int, str]] = []
    sequence = 0

    def at(when: float, machine: Machine, kind: str) -> None:
        nonlocal sequence
        sequence += 1
        heapq.heappush(events, (when, sequence, machine.index, kind))

    def jittered() -> float:
        return INTERVAL * (1 + JITTER * (2 * rng.random() - 1))

    for m in machines:
        at(rng.uniform(0, INTERVAL), m, "check")

    rebooting: Counter[str] = Counter()  # group -> machines between reboot and blessing
    max_reboots = max_per_group = 0
    counts: Counter[Version] = Counter({BASE: args.machines})
    reached: dict[Version, dict[int, float]] = {v: {} for v, _ in publish}
    result = Result("etcd-lock" if locked else "immediate", reached, 0, 0)
    next_sample = 0.0
    horizon = (args.second_at + 72) * 3600.0
    handled = 0
    started = time.perf_counter()

    while events:
        now, _, index, kind = heapq.heappop(events)
        if now > horizon:
            break
        handled += 1
        while next_sample <= now:
            result.samples.append((next_sample / 3600, Counter(counts), sum(rebooting.values())))
            next_sample += SAMPLE
        m = machines[index]
        wall = T0 + timedelta(seconds=now)
        if kind == "check":
            channel = ChannelManifest(
                "stable",
                releases=tuple(
                    release(v, T0 + timedelta(seconds=t)) for v, t in publish if t <= now
                ),
            )
            chosen = select_candidate(
                channel,
                image="containerhost",
                arch="x86_64",
                booted=m.version,
                seed=m.seed,
                now=wall,
            ).release
            if chosen is not None and (m.pending is None or chosen.version > m.pending):
                at(now + rng.uniform(300, 900), m, "installed")  # download and verify
                m.pending = chosen.version
                result.downloads += 1
                continue
            if m.pending is not None:
                at(now, m, "gate")
                continue
            at(now + jittered(), m, "check")
        elif kind == "installed" or kind == "gate":
            decision = m.gate.acquire(wall)
            if not decision.allowed:
                retry = jittered() if decision.retry_after is None else decision.retry_after
                at(now + min(retry, jittered()), m, "check")
                continue
            m.holding = True
            rebooting[m.group] += 1
            max_reboots = max(max_reboots, sum(rebooting.values()))
            max_per_group = max(max_per_group, rebooting[m.group])
            at(now + rng.uniform(120, 300), m, "booted")  # shutdown, firmware, boot
        elif kind == "booted":
            assert m.pending is not None
            counts[m.version] -= 1
            m.version, m.pending = m.pending, None
            counts[m.version] += 1
            for v in reached:
                updated = sum(c for version, c in counts.items() if version >= v)
                for percent in (50, 99, 100):
                    if percent not in reached[v] and updated * 100 >= percent * args.machines:
                        published = next(t for version, t in publish if version == v)
                        reached[v][percent] = (now - published) / 3600
            at(now + rng.uniform(60, 180), m, "blessed")  # health checks, boot-complete
        elif kind == "blessed":
            rebooting[m.group] -= 1
            m.gate.release()  # steady-state
            m.holding = False
            at(now + jittered(), m, "check")
    result.max_reboots, result.max_per_group = max_reboots, max_per_group
    result.events = handled
    result.seconds = time.perf_counter() - started
    if locked:
        # The watcher's view: no group's semaphore ever had more holders than slots, and none
        # is left holding once everyone is blessed.
        for g in {m.group for m in machines}:
            sem, _ = SemaphoreClient(store, g, args.slots).show()
            assert len(sem.holders) <= sem.total_slots, (g, sem)
    return result


def table(results: list[Result], args: argparse.Namespace) -> str:
    versions = sorted({v for r in results for v in r.reached})
    lines = [
        f"{args.machines} machines, {args.groups} groups, {args.slots} slots per group, default "
        "waves (5% at once, 25% at 4 h, 50% at 12 h, all at 24 h), checks every 1 h ±10%;",
        "hours from each release's publish until that share of the fleet runs it or newer",
        "",
        f"{'strategy':<11} {'release':<8} {'50%':>8} {'99%':>8} {'100%':>8} "
        f"{'max reboots':>12} {'per group':>10} {'events':>9} {'sim s':>6}",
    ]
    for r in results:
        for v in versions:
            hours = [r.reached[v].get(p) for p in (50, 99, 100)]
            cells = [f"{h:7.1f}h" if h is not None else "   never" for h in hours]
            lines.append(
                f"{r.label:<11} {v!s:<8} {cells[0]:>8} {cells[1]:>8} {cells[2]:>8} "
                f"{r.max_reboots:>12} {r.max_per_group:>10} {r.events:>9} {r.seconds:>6.1f}"
            )
    if len(results) == 2:
        locked, free = results
        lines.append("")
        lines.append(
            f"most concurrent reboots: etcd-lock {locked.max_reboots} vs immediate "
            f"{free.max_reboots} ({free.max_reboots / max(locked.max_reboots, 1):.1f}x fewer); "
            f"bound {args.groups * args.slots} = groups x slots"
        )
    return "\n".join(lines)


DELTA = OUT / "bench_delta.json"  # written by bench/bench_delta.py


def egress(results: list[Result]) -> str:
    """The repository's egress for the simulated downloads, full and seeded, from the bytes one
    machine fetched in bench/bench_delta.py's last run (its pairs of real builds)."""
    try:
        measured = json.loads(DELTA.read_text())
    except FileNotFoundError:
        return f"egress: no {DELTA.relative_to(OUT.parent.parent)}; run bench/bench_delta.py first"
    downloads = results[0].downloads
    lines = [
        f"repository egress for the {downloads} downloads of the etcd-lock run, per kind of "
        "release (bytes one machine fetched in bench_delta's run of "
        f"{measured['when']}):",
        f"{'release like':<24} {'full':>10} {'seeded':>10} {'saved':>7}",
    ]
    for name, pair in measured["pairs"].items():
        full, seeded = downloads * pair["full"], downloads * pair["seeded"]
        lines.append(
            f"{name:<24} {full / 1e9:>8.1f}GB {seeded / 1e9:>8.2f}GB {1 - seeded / full:>7.1%}"
        )
    return "\n".join(lines)


def plot(results: list[Result], path: Path) -> None:
    try:
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        print("installing matplotlib into this venv for the plot", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=True)
        plt = importlib.import_module("matplotlib.pyplot")
    importlib.import_module("matplotlib").use("Agg")
    fig, axes = plt.subplots(2, len(results), figsize=(7 * len(results), 7), sharex=True)
    for column, r in enumerate(results):
        top, bottom = (axes[0][column], axes[1][column]) if len(results) > 1 else axes
        hours = [h for h, _, _ in r.samples]
        versions = sorted({v for _, c, _ in r.samples for v in c})
        top.stackplot(
            hours,
            [[c.get(v, 0) for _, c, _ in r.samples] for v in versions],
            labels=[str(v) for v in versions],
        )
        top.set_title(f"{r.label}: versions across the fleet")
        top.set_ylabel("machines")
        top.legend(loc="upper left")
        bottom.plot(hours, [n for _, _, n in r.samples], linewidth=0.8)
        bottom.set_title(f"reboots in progress (max {r.max_reboots})")
        bottom.set_xlabel("hours after the first release")
        bottom.set_ylabel("machines")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=10_000)
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument(
        "--second-at",
        type=float,
        default=18.0,
        help="hours after the first release to publish a second one (0: none)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    results = [simulate(args, locked=True), simulate(args, locked=False)]
    print(table(results, args))
    print()
    print(egress(results))
    if not args.no_plot:
        path = OUT / "fleet_sim.png"
        plot(results, path)
        print(f"\nplot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
