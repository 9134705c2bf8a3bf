"""`./build.py`: the command-line front end. The only place that turns errors into exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

from builder import formats, image
from builder.config import ImageConfig, OutputFormat, list_images, load_image
from builder.counter import default_version
from builder.errors import BuildError
from builder.log import complete_step, log, timings
from builder.publish import PublishResult
from builder.run import ensure_host_packages
from updater.release.version import Version, version_argument

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE = "containerhost"
ALL_FORMATS = "all"

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
)
TEST_FILES = (
    "/usr/share/OVMF/OVMF_CODE_4M.fd",
    "/usr/share/OVMF/OVMF_VARS_4M.fd",
    "/usr/lib/x86_64-linux-gnu/libc.a",
)


def build_config(image_name: str, requested: list[str] | None) -> ImageConfig:
    """The definition, with --format's list (if given) replacing its `formats`: exactly those."""
    config = load_image(image_name, REPO / "images")
    if not requested:
        return config
    chosen = list(OutputFormat) if ALL_FORMATS in requested else requested
    return dataclasses.replace(config, formats=tuple(dict.fromkeys(map(OutputFormat, chosen))))


def _cmd_build(args: argparse.Namespace) -> int:
    config = build_config(args.image, args.formats)
    tools = (*image.BUILD_TOOLS, *formats.host_tools(config.formats))
    ensure_host_packages(tools, image.BUILD_FILES)
    version: Version = args.version or default_version(REPO / "out")
    log(f"Building image '{config.name}' version {version}")
    result = image.build_image(
        config, version, REPO, refresh=args.refresh, extra_trees=args.extra_tree
    )
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


def _cmd_keys(args: argparse.Namespace) -> int:
    from builder import publish

    if args.action == "init":
        publish.init_keys(args.keys, root_threshold=args.root_threshold, root_keys=args.root_keys)
        log(
            f"Created TUF keys in {args.keys}/ (root: {args.root_keys} key(s), threshold "
            f"{args.root_threshold}). Move root-*.pem offline: see docs/updates.md."
        )
    elif args.action == "rotate":
        publish.rotate_key(args.keys, args.role)
        log(f"Rotated the {args.role} key; publish or refresh to re-sign with it.")
    elif args.action == "renew-root":
        publish.renew_root(args.keys)
        log("Signed a new root version with a fresh expiry.")
    else:
        for role, info in publish.describe_keys(args.keys).items():
            print(f"{role:<10} {info}")
    return 0


def _print_result(result: PublishResult) -> None:
    log("repository changed" if result.changed else "repository unchanged (already published)")
    log(
        f"metadata versions: targets {result.targets_version}, snapshot "
        f"{result.snapshot_version}, timestamp {result.timestamp_version}"
    )
    for role, when in sorted(result.expires.items()):
        log(f"{role} expires {when:%Y-%m-%d %H:%M} UTC")


def _cmd_publish(args: argparse.Namespace) -> int:
    from builder import publish

    if args.refresh:
        result = publish.refresh(args.repo, args.keys, timestamp_only=args.timestamp_only)
    elif args.release is None:
        raise BuildError("publish needs a release directory (out/<image>/<version>) or --refresh")
    else:
        result = publish.publish(
            args.release,
            args.repo,
            args.keys,
            args.channel,
            immediate=args.now,
            max_version=args.max_version,
        )
        if args.no_max_version:
            result = publish.set_max_version(args.repo, args.keys, args.channel, None)
    _print_result(result)
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from builder import publish

    result = publish.pull(
        args.repo,
        args.keys,
        args.channel,
        args.version,
        image=args.image,
        undo=args.undo,
    )
    _print_result(result)
    return 0


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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="./build.py",
        description="Build, boot and test Berth images. With no command: build containerhost.",
    )
    sub = p.add_subparsers(dest="command")
    b = sub.add_parser("build", help="build an image into out/<image>/<version>/")
    b.add_argument("image", nargs="?", default=DEFAULT_IMAGE, help="image name or .toml path")
    b.add_argument(
        "--version",
        type=version_argument,
        help="MAJOR.MINOR.PATCH (default: YYYY.MMDD.N from date)",
    )
    b.add_argument("--refresh", action="store_true", help="bootstrap again, ignoring the cache")
    b.add_argument(
        "--extra-tree",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="copy DIR onto the image tree after the overlays (repeatable)",
    )
    b.add_argument(
        "--format",
        dest="formats",
        action="append",
        choices=[*(f.value for f in OutputFormat), ALL_FORMATS],
        metavar="FORMAT",
        help="write this disk format instead of the definition's `formats` (repeatable; "
        f"{', '.join(f.value for f in OutputFormat)} or {ALL_FORMATS}; docs/platforms.md)",
    )
    b.set_defaults(func=_cmd_build)
    r = sub.add_parser(
        "run", help="boot an image or disk file in QEMU (see `run --help`)", add_help=False
    )
    r.add_argument("rest", nargs=argparse.REMAINDER)
    r.set_defaults(func=_cmd_run)
    k = sub.add_parser("keys", help="manage the TUF signing keys (docs/updates.md)")
    k.add_argument("action", choices=["init", "rotate", "renew-root", "show"])
    k.add_argument(
        "role",
        nargs="?",
        choices=["root", "targets", "snapshot", "timestamp"],
        help="the role whose key `rotate` replaces",
    )
    k.add_argument("--keys", type=Path, default=REPO / "keys", help="keys directory (keys/)")
    k.add_argument("--root-threshold", type=int, default=1)
    k.add_argument("--root-keys", type=int, default=1)
    k.set_defaults(func=_cmd_keys)
    pb = sub.add_parser("publish", help="add a release to a channel of a TUF repository")
    pb.add_argument("release", nargs="?", type=Path, help="out/<image>/<version>")
    pb.add_argument("--repo", type=Path, required=True, help="repository directory")
    pb.add_argument("--keys", type=Path, default=REPO / "keys")
    pb.add_argument("--channel", default="stable")
    pb.add_argument("--now", action="store_true", help="open every wave at once")
    pb.add_argument(
        "--max-version",
        type=version_argument,
        help="no machine in the channel goes above this version",
    )
    pb.add_argument("--no-max-version", action="store_true", help="lift the channel's pin")
    pb.add_argument("--refresh", action="store_true", help="re-sign expiring metadata only")
    pb.add_argument("--timestamp-only", action="store_true", help="with --refresh")
    pb.set_defaults(func=_cmd_publish)
    pl = sub.add_parser("pull", help="withdraw a release: no machine installs it")
    pl.add_argument("version", type=version_argument)
    pl.add_argument("--repo", type=Path, required=True)
    pl.add_argument("--keys", type=Path, default=REPO / "keys")
    pl.add_argument("--channel", default="stable")
    pl.add_argument("--image", help="only this image's release of that version")
    pl.add_argument("--undo", action="store_true", help="put a pulled release back")
    pl.set_defaults(func=_cmd_pull)
    ls = sub.add_parser("list", help="list image definitions")
    ls.set_defaults(func=_cmd_list)
    t = sub.add_parser("test", help="ruff, mypy and the whole pytest suite (VM tests included)")
    t.add_argument(
        "--slow", action="store_true", help="also run the slow VM scenarios (20 power cuts, ...)"
    )
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
