"""`./build.py`: the command-line front end. The only place that turns errors into exit codes."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from builder import image
from builder.config import list_images, load_image
from builder.errors import BuildError
from builder.log import complete_step, log, timings
from builder.run import ensure_host_packages
from updater.version import Version, default_version

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE = "containerhost"

# Host packages the test suite needs beyond the build's (VM boots, SSH, GPT checks).
TEST_TOOLS = (
    "qemu-system-x86_64",
    "ssh",
    "ssh-keygen",
    "sfdisk",
    "gcc",
    "nginx",
    "veritysetup",
    "timeout",
)
TEST_FILES = (
    "/usr/share/OVMF/OVMF_CODE_4M.fd",
    "/usr/share/OVMF/OVMF_VARS_4M.fd",
    "/usr/lib/x86_64-linux-gnu/libc.a",
)


def _cmd_build(args: argparse.Namespace) -> int:
    ensure_host_packages(image.BUILD_TOOLS, image.BUILD_FILES)
    config = load_image(args.image, REPO / "images")
    version = Version.parse(args.version) if args.version else default_version(REPO / "out")
    log(f"Building image '{config.name}' version {version}")
    result = image.build_image(config, version, REPO, refresh=args.refresh)
    log("")
    log(f"{'stage':<50} {'seconds':>8}")
    for title, seconds in timings():
        log(f"{title:<50} {seconds:>8.1f}")
    log(f"Built {config.name} {version} in {result.seconds:.1f}s: {result.output}")
    log(f"Boot it: ./build.py run {config.name}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    ensure_host_packages(("qemu-system-x86_64", "qemu-img", "ssh", "ssh-keygen"), TEST_FILES)
    from qemu.__main__ import main as qemu_main

    return qemu_main(["run", *args.rest])


def _cmd_list(args: argparse.Namespace) -> int:
    for name in list_images(REPO / "images"):
        config = load_image(name, REPO / "images")
        print(f"{name:<16} {config.description}")
    return 0


def _cmd_test(args: argparse.Namespace) -> int:
    """Lint, type-check, then run the whole test suite (unit tests first, then VM tests)."""
    ensure_host_packages((*image.BUILD_TOOLS, *TEST_TOOLS), (*image.BUILD_FILES, *TEST_FILES))
    venv = Path(sys.prefix) / "bin"
    steps: list[tuple[str, list[str | Path]]] = [
        ("ruff format --check", [venv / "ruff", "format", "--check", "."]),
        ("ruff check", [venv / "ruff", "check", "."]),
        ("mypy", [venv / "mypy"]),
        ("pytest", [venv / "pytest", *args.pytest_args]),
    ]
    for title, cmd in steps:
        with complete_step(title):
            if subprocess.run([str(c) for c in cmd], cwd=REPO).returncode != 0:
                log(f"{title} failed")
                return 1
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="./build.py",
        description="Build, boot and test Berth images. With no command: build containerhost.",
    )
    sub = p.add_subparsers(dest="command")
    b = sub.add_parser("build", help="build an image into out/<image>/<version>/")
    b.add_argument("image", nargs="?", default=DEFAULT_IMAGE, help="image name or .toml path")
    b.add_argument("--version", help="MAJOR.MINOR.PATCH (default: YYYY.MMDD.N from date)")
    b.add_argument("--refresh", action="store_true", help="bootstrap again, ignoring the cache")
    b.set_defaults(func=_cmd_build)
    r = sub.add_parser(
        "run", help="boot an image or disk file in QEMU (see `run --help`)", add_help=False
    )
    r.add_argument("rest", nargs=argparse.REMAINDER)
    r.set_defaults(func=_cmd_run)
    ls = sub.add_parser("list", help="list image definitions")
    ls.set_defaults(func=_cmd_list)
    t = sub.add_parser("test", help="ruff, mypy and the whole pytest suite (VM tests included)")
    t.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra pytest arguments")
    t.set_defaults(func=_cmd_test)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv if argv is not None else sys.argv[1:])
    if args.command is None:
        args = parser().parse_args(["build"])
    try:
        code: int = args.func(args)
        return code
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
