"""`./build.py test`: ruff, mypy, then the test suite (unit tests first, then VM tests)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from builder import image
from builder.log import complete_step, log
from builder.run import ensure_host_packages
from cli import REPO

# Host packages the test suite needs beyond the build's (VM boots, SSH, GPT checks).
TEST_TOOLS = (
    "qemu-system-x86_64",
    "ssh",
    "ssh-keygen",
    "sfdisk",
    "gcc",
    "nginx",
    "etcd",
    "veritysetup",
    "timeout",
    # Real components the unit tests drive: a signed local archive, sysusers and tmpfiles.
    "gpg",
    "systemd-sysusers",
    "systemd-tmpfiles",
    # Secure Boot signatures, made and listed by the real tools (tests/test_authenticode.py).
    "sbsign",
    "sbverify",
    "cert-to-efi-sig-list",
    "hash-to-efi-sig-list",
    "openssl",
    # The VM harness's software TPM 2.0 (VMConfig.tpm, `./build.py run --tpm`).
    "swtpm",
    # A machine's encrypted STATE read back on the host with its recovery key.
    "cryptsetup",
    "losetup",
    "debugfs",
)
TEST_FILES = (
    "/usr/share/OVMF/OVMF_CODE_4M.fd",
    "/usr/share/OVMF/OVMF_VARS_4M.fd",
    "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
    "/usr/lib/x86_64-linux-gnu/libc.a",
    "/usr/lib/systemd/boot/efi/systemd-bootx64.efi",
)


def cmd_test(args: argparse.Namespace) -> int:
    """Lint, type-check, then run the whole test suite (unit tests first, then VM tests)."""
    ensure_host_packages((*image.BUILD_TOOLS, *TEST_TOOLS), (*image.BUILD_FILES, *TEST_FILES))
    venv = Path(sys.prefix) / "bin"
    steps: list[tuple[str, list[str | Path]]] = [
        ("ruff format --check", [venv / "ruff", "format", "--check", "."]),
        ("ruff check", [venv / "ruff", "check", "."]),
        ("mypy", [venv / "mypy"]),
    ]
    if args.pytest_args:
        steps.append(("pytest", [venv / "pytest", *args.pytest_args]))
    else:
        # The fast tier first: a broken unit fails the run in seconds, not after the boots.
        steps.append(("unit tests", [venv / "pytest", "-m", "not vm"]))
        steps.append(("VM tests", [venv / "pytest", "-m", "vm and not slow"]))
        if args.slow:
            # Long scenarios (20 power cuts, ...): run on demand, not in CI's 90 minutes.
            steps.append(("slow VM tests", [venv / "pytest", "-m", "slow", "-s"]))
    for title, cmd in steps:
        with complete_step(title):
            code = subprocess.run([str(c) for c in cmd], cwd=REPO).returncode
            # pytest's 5 means "no tests collected": a selection may legitimately be empty.
            if code not in (0, 5) or (code == 5 and not title.endswith("VM tests")):
                log(f"{title} failed")
                return 1
    return 0
