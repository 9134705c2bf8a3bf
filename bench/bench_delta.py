"""Measure seeded updates on real builds, beside full updates and casync on the same pairs.

    .venv/bin/python -m bench.bench_delta [--image containerhost] [--add jq] [--remove curl]
                                          [--workdir DIR] [--memory-mib 2048]

Builds five versions of the image from the same package cache: a base, then (a) the same inputs
with the version bumped, (b) one package added, (c) one package removed, (d) one file of the
image's extra tree changed. For each pair (base, X) it publishes X into a TUF repository served
by nginx on loopback and applies it on a tests.support.machine.FakeMachine whose slot A and ESP
hold the base: once seeded (the blocks the base has are copied, the rest fetched by range), once
in full (a machine whose booted root shares nothing with X). Bytes fetched and requests come
from nginx's access log; the wall time is the agent's whole apply. Beside them, casync (Debian's
`casync`, default chunking and compression) on the same pair and the same nginx: the bytes
`casync extract --seed=<base file>` fetches for root.erofs and uki.efi from X's chunk store.
The layout columns say how many of X's root.erofs blocks sit where the base has the same
bytes, and how many the base has anywhere.

Last, the seeded apply's peak memory for a `--memory-mib` root that differs from the booted one
in a few blocks, against the target of 64 MB: the peak resident size of the worker that runs
it, forked as the daemon forks its worker, in a process that imports only what the daemon
does (bench/worker_memory.py), and what that worker held when it was forked.
`--memory-only` measures just that, without building anything.

Runs as root. Compare figures from one run only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.table import print_table
from builder.config import ImageConfig, load_image
from builder.image import BuildResult, build_image
from builder.run import ensure_host_packages, run
from updater.release.blockindex import digest_blocks
from updater.release.manifest import PAYLOAD_FILES
from updater.release.version import Version

REPO = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "out"  # bench_delta.json, for bench/fleet_sim.py
MiB = 1 << 20
BLOCK = 4096
EXTRA_FILE = "etc/berth-bench.conf"


def package_variants(config: ImageConfig, add: str, remove: str) -> dict[str, ImageConfig]:
    """The image, with `add` added, and with `remove` removed: one-package changes."""
    if remove not in config.packages:
        raise SystemExit(
            f"{remove} is not one of {config.name}'s packages: pick another with --remove"
        )
    return {
        "base": config,
        f"+{add}": dataclasses.replace(config, packages=(*config.packages, add)),
        f"-{remove}": dataclasses.replace(
            config, packages=tuple(p for p in config.packages if p != remove)
        ),
    }


def build_pairs(image: str, add: str, remove: str, work: Path) -> dict[str, BuildResult]:
    config = load_image(image, REPO / "images")
    one = package_variants(config, add, remove)
    base = Version(8000, int(time.time()) % 100000, 0)

    def tree(name: str, text: str) -> Path:
        path = work / f"tree-{name}" / EXTRA_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path.parents[1]

    same, changed = tree("base", "setting = 1\n"), tree("changed", "setting = 22\n")
    variants = {
        "base": (config, same),
        "(a) version bump": (config, same),
        f"(b) +{add}": (one[f"+{add}"], same),
        f"(c) -{remove}": (one[f"-{remove}"], same),
        "(d) one file changed": (config, changed),
    }
    built = {}
    for patch, (name, (variant, extra)) in enumerate(variants.items()):
        version = Version(base.major, base.minor, patch)
        print(f"building {name} as {version}", flush=True)
        built[name] = build_image(
            variant, version, REPO, out_dir=work / "out", extra_trees=(extra,)
        )
    return built


def layout(old: Path, new: Path) -> tuple[float, float]:
    """Shares of `new`'s blocks at the same place in `old`, and anywhere in `old`."""
    a, b = digest_blocks(old.read_bytes()), digest_blocks(new.read_bytes())
    blocks = len(b) // 32
    olds = {a[i : i + 32] for i in range(0, len(a), 32)}
    in_place = sum(1 for i in range(0, len(b), 32) if b[i : i + 32] == a[i : i + 32])
    anywhere = sum(1 for i in range(0, len(b), 32) if b[i : i + 32] in olds)
    return in_place / blocks, anywhere / blocks


@dataclasses.dataclass(frozen=True)
class Applied:
    fetched: int
    requests: int
    seconds: float


def apply_on(work: Path, booted: Path, new: Path, label: str) -> Applied:
    """Publish `new`, apply it on a fake machine booted from `booted`: nginx's figures."""
    from builder import publish as pub
    from tests.support import machine as tm
    from tests.support.servers import NginxServer
    from updater.agent import Agent
    from updater.config import UpdateConfig

    base = work / label
    base.mkdir()
    keys = work / "keys"
    if not keys.exists():
        pub.init_keys(keys)
    size = max((new / "root.erofs").stat().st_size, (booted / "root.erofs").stat().st_size)
    tm.SLOT_DATA = -(-(size + 16 * MiB) // MiB) * MiB
    tm.SLOT_VERITY = -(-(size // 64 + 4 * MiB) // MiB) * MiB
    (base / "repo").mkdir()
    pub.publish(new, base / "repo", keys, "stable", immediate=True)
    fake = tm.FakeMachine(base / "machine", booted)
    with NginxServer(base / "repo", base / "nginx") as server:
        agent = Agent(
            fake.machine(keys / "root.json"), UpdateConfig(url=server.url, channel="stable")
        )
        start = time.perf_counter()
        agent.apply()
        seconds = time.perf_counter() - start
        served = [r for r in server.requests() if r.request.startswith("GET ")]
        payload = [r for r in served if "/targets/" in r.request and "/channels/" not in r.request]
        fetched = sum(r.body_bytes for r in payload)
        return Applied(fetched, len(payload), seconds)


def unrelated(work: Path, like: Path) -> Path:
    """A release of the same sizes whose root and UKI share nothing with anything built."""
    from tests.support import machine as tm

    size = (like / "root.erofs").stat().st_size
    return tm.make_verity_release(
        work / "out-unrelated",
        "0.0.1",
        data_size=-(-size // BLOCK) * BLOCK,
        uki=os.urandom((like / "uki.efi").stat().st_size),
    )


def casync_fetch(work: Path, old: Path, new: Path, label: str) -> tuple[int, int]:
    """Bytes and requests `casync extract` fetches over HTTP for root.erofs and uki.efi of
    `new`, seeded with `old`'s."""
    from tests.support.servers import NginxServer

    site = work / f"casync-{label}"
    (site / "www").mkdir(parents=True)
    for name in ("root.erofs", "uki.efi"):
        run(
            [
                "casync",
                "make",
                f"--store={site / 'www/store'}",
                site / f"www/{name}.caibx",
                new / name,
            ]
        )
    with NginxServer(site / "www", site / "nginx") as server:
        for name in ("root.erofs", "uki.efi"):
            run(
                [
                    "casync",
                    "extract",
                    f"--store={server.url}store",
                    f"--seed={old / name}",
                    f"{server.url}{name}.caibx",
                    site / name,
                ]
            )
            if (site / name).read_bytes() != (new / name).read_bytes():
                raise SystemExit(f"casync extracted another {name} than the release's")
        served = [r for r in server.requests() if r.request.startswith("GET ")]
        return sum(r.body_bytes for r in served), len(served)


def peak_memory(work: Path, mib: int) -> dict[str, int]:
    """A seeded apply of a `mib` MiB root that differs from the booted one in 8 blocks, run by
    bench.worker_memory as the daemon's worker runs it: its figures."""
    import pickle

    from builder import publish as pub
    from tests.support import machine as tm
    from tests.support.servers import NginxServer
    from updater.config import UpdateConfig

    data = bytearray(os.urandom(mib * MiB))
    booted = tm.make_verity_release(work / "out-mem-old", "1.0.0", data=bytes(data))
    for i in range(0, len(data) // BLOCK, len(data) // BLOCK // 8):
        data[i * BLOCK : (i + 1) * BLOCK] = os.urandom(BLOCK)
    new = tm.make_verity_release(work / "out-mem-new", "1.1.0", data=bytes(data))
    del data
    base = work / "memory"
    base.mkdir()
    keys = work / "keys"
    if not keys.exists():
        pub.init_keys(keys)
    tm.SLOT_DATA = -(-((new / "root.erofs").stat().st_size + 16 * MiB) // MiB) * MiB
    tm.SLOT_VERITY = -(-((new / "root.erofs").stat().st_size // 64 + 4 * MiB) // MiB) * MiB
    (base / "repo").mkdir()
    pub.publish(new, base / "repo", keys, "stable", immediate=True)
    fake = tm.FakeMachine(base / "machine", booted)
    with NginxServer(base / "repo", base / "nginx") as server:
        spec = base / "spec.pickle"
        config = UpdateConfig(url=server.url, channel="stable")
        spec.write_bytes(pickle.dumps((fake.machine(keys / "root.json"), config)))
        out = subprocess.run(
            [sys.executable, "-m", "bench.worker_memory", str(spec)],
            cwd=REPO,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    figures: dict[str, int] = json.loads(out.strip().splitlines()[-1])
    return figures


def _print_memory(mib: int, memory: dict[str, int]) -> None:
    peak, at_fork = memory["peak"], memory["at_fork"]
    print_table(
        [
            (
                f"the worker's peak RSS, seeded apply of a {mib} MiB root, 8 blocks changed",
                _mb(peak),
                f"target <= 64 MB: {peak / 64e6:.2f} of it; fetched {_mb(memory['fetched'])}, "
                f"reused {_mb(memory['reused'])}",
            ),
            (
                "  of which resident when it was forked (interpreter, the daemon's imports)",
                _mb(at_fork),
                f"the apply added {_mb(peak - at_fork)} (the agent's imports included)",
            ),
        ],
        10,
    )


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", default="containerhost")
    p.add_argument("--add", default="jq", help="the package pair (b) adds")
    p.add_argument("--remove", default="curl", help="the package pair (c) removes")
    p.add_argument("--memory-mib", type=int, default=2048)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    p.add_argument(
        "--memory-only", action="store_true", help="only the peak memory: no builds, no pairs"
    )
    args = p.parse_args()
    if args.memory_only:
        with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-delta-") as tmp:
            _print_memory(args.memory_mib, peak_memory(Path(tmp), args.memory_mib))
        return 0
    ensure_host_packages(("casync", "nginx"))
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-delta-") as tmp:
        work = Path(tmp)
        built = build_pairs(args.image, args.add, args.remove, work)
        base = built.pop("base").output
        full_source = unrelated(work, base)
        rows: list[tuple[str, ...]] = [
            (
                "pair",
                "payload",
                "seeded: fetched",
                "req",
                "time",
                "full: fetched",
                "req",
                "time",
                "ratio",
                "casync",
                "req",
                "seeded/casync",
                "root in place",
                "anywhere",
            )
        ]
        measured: list[tuple[str, int, int]] = []
        for n, (name, result) in enumerate(built.items()):
            new = result.output
            payload = sum((new / f).stat().st_size for f in PAYLOAD_FILES)
            seeded = apply_on(work, base, new, f"seeded-{n}")
            full = apply_on(work, full_source, new, f"full-{n}")
            cas, cas_requests = casync_fetch(work, base, new, str(n))
            in_place, anywhere = layout(base / "root.erofs", new / "root.erofs")
            measured.append((name, seeded.fetched, full.fetched))
            rows.append(
                (
                    name,
                    _mb(payload),
                    _mb(seeded.fetched),
                    str(seeded.requests),
                    f"{seeded.seconds:.1f} s",
                    _mb(full.fetched),
                    str(full.requests),
                    f"{full.seconds:.1f} s",
                    f"{seeded.fetched / full.fetched:.2%}",
                    _mb(cas),
                    str(cas_requests),
                    f"{seeded.fetched / cas:.2f}",
                    f"{in_place:.1%}",
                    f"{anywhere:.1%}",
                )
            )
        memory = peak_memory(work, args.memory_mib)
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_delta.json").write_text(
        json.dumps(
            {
                "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "pairs": {
                    name: {"seeded": seeded, "full": full} for name, seeded, full in measured
                },
            },
            indent=2,
        )
        + "\n"
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print()
    _print_memory(args.memory_mib, memory)
    print("targets: (a) <= 1% of the full payload; (b)-(d) <= 10%, and below casync")
    return 0


if __name__ == "__main__":
    sys.exit(main())
