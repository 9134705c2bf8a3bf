"""What Secure Boot signing adds to a build: signing the UKI and systemd-boot, beside sbsign.

    .venv/bin/python -m bench.bench_signing [--uki out/containerhost/latest/uki.efi]

Signs the given UKI (a built one: its signature, if any, is replaced) and the host's
systemd-boot with throwaway development keys, three times each, with builder.signing (what the
build runs) and with sbsign (Debian's sbsigntool, for reference), and prints the median times
beside this machine's sha256 rate over the same bytes (the Authenticode hash is one pass). Also
whether two signings of the same input gave the same bytes (builder.signing must; sbsign stamps
the signing time, so it does not once the clock has moved on).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench.table import print_table
from builder.publish import secureboot
from builder.run import ensure_host_packages, find_tool, run
from builder.signing import sign_image

REPO = Path(__file__).resolve().parent.parent
SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")


def _median(action: Callable[[], object], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--uki", type=Path, default=REPO / "out/containerhost/latest/uki.efi")
    args = p.parse_args()
    ensure_host_packages(("sbsign",), (str(SYSTEMD_BOOT),))
    if not args.uki.exists():
        raise SystemExit(f"no UKI at {args.uki}: build one first (./build.py) or pass --uki")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-signing-") as tmp:
        work = Path(tmp)
        secureboot.init_secureboot_keys(work / "keys")
        key, cert = work / "keys/secureboot/db.key", work / "keys/secureboot/db.crt"

        def sbsign(path: Path, out: Path) -> bytes:
            run(
                [find_tool("sbsign"), "--key", key, "--cert", cert, "--output", out, path],
                quiet=True,
            )
            return out.read_bytes()

        for name, path in (("UKI", args.uki), ("systemd-boot", SYSTEMD_BOOT)):
            image = path.read_bytes()
            ours = _median(partial(sign_image, image, key, cert, name))
            theirs = _median(partial(sbsign, path, work / "s.efi"))
            sha = _median(partial(hashlib.sha256, image))
            same = sign_image(image, key, cert, name) == sign_image(image, key, cert, name)
            first = sbsign(path, work / "a.efi")
            time.sleep(1.1)  # sbsign's signing time has a resolution of a second
            sbsign_same = first == sbsign(path, work / "b.efi")
            rows += [
                (
                    f"{name} ({len(image) / 1e6:.1f} MB): builder.signing",
                    f"{ours:.3f} s",
                    f"reproducible: {same}",
                ),
                ("  sbsign, for reference", f"{theirs:.3f} s", f"reproducible: {sbsign_same}"),
                ("  sha256 of the same bytes", f"{sha:.3f} s", f"signing takes {ours / sha:.1f}x"),
            ]
    print_table(rows, 10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
