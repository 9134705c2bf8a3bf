#!/usr/bin/env python3
"""Berth's one entry point: build images, boot them, run the tests.  ./build.py --help

This file only bootstraps: it makes sure the Python environment in .venv exists and matches
requirements.txt, then runs the command line (cli/, parser and dispatch in cli/main.py) inside it.
Standard library only, so it runs on a fresh Debian machine's python3.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
VENV = REPO / ".venv"
STAMP = VENV / ".requirements.sha256"


def _in_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def _ensure_venv() -> None:
    wanted = hashlib.sha256((REPO / "requirements.txt").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == wanted:
        return
    python = shutil.which("python3") or sys.executable
    probe = subprocess.run([python, "-c", "import ensurepip, venv"], capture_output=True)
    if probe.returncode != 0:
        if os.geteuid() == 0 and Path("/etc/debian_version").exists():
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
            subprocess.run(["apt-get", "install", "-y", "-qq", "python3-venv"], check=True, env=env)
        else:
            sys.exit("error: Python's venv module is missing\nhint: apt-get install python3-venv")
    print("‣ Preparing the Python environment in .venv", file=sys.stderr, flush=True)
    subprocess.run([python, "-m", "venv", "--clear", str(VENV)], check=True)
    pip = [str(VENV / "bin/python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "-r", str(REPO / "requirements.txt")], check=True)
    STAMP.write_text(wanted + "\n")


if __name__ == "__main__":
    if not _in_venv():
        _ensure_venv()
        python = str(VENV / "bin/python")
        os.execv(python, [python, str(Path(__file__).resolve()), *sys.argv[1:]])
    sys.path.insert(0, str(REPO))
    from cli.main import main

    sys.exit(main(sys.argv[1:]))
