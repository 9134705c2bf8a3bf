"""`./build.py run`: boot an image or disk file under QEMU, with `python -m qemu run`'s options."""

from __future__ import annotations

import argparse

from builder.run import ensure_host_packages
from cli.test import TEST_FILES
from qemu.__main__ import main as qemu_main


def cmd_run(args: argparse.Namespace) -> int:
    ensure_host_packages(("qemu-system-x86_64", "qemu-img", "ssh", "ssh-keygen"), TEST_FILES)
    return qemu_main(["run", *args.rest])
