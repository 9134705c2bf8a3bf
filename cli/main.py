"""`./build.py`'s parser and dispatch: the only place that turns errors into exit codes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from builder.config import OutputFormat
from builder.errors import BuildError
from cli import REPO
from cli.build import (
    ALL_FORMATS,
    DEFAULT_IMAGE,
    build_conflict,
    cmd_build,
    cmd_list,
    snapshot_argument,
)
from cli.publish import (
    DEFAULT_CHANNEL,
    cmd_keys,
    cmd_publish,
    cmd_pull,
    keys_conflict,
    publish_conflict,
)
from cli.run import cmd_run
from cli.test import cmd_test
from updater.release.version import version_argument


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
        "--snapshot",
        type=snapshot_argument,
        metavar="YYYYMMDDTHHMMSSZ",
        help="the packages as Debian's snapshot archive had them then (overrides the image's)",
    )
    b.add_argument(
        "--offline",
        action="store_true",
        help="reuse the cached package tree without asking the archive for newer versions",
    )
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
    b.set_defaults(func=cmd_build, conflict=build_conflict)
    r = sub.add_parser(
        "run", help="boot an image or disk file in QEMU (see `run --help`)", add_help=False
    )
    r.add_argument("rest", nargs=argparse.REMAINDER)
    r.set_defaults(func=cmd_run)
    k = sub.add_parser(
        "keys", help="manage the TUF, Secure Boot and PCR keys (docs/updates.md, docs/security.md)"
    )
    k.add_argument("action", choices=["init", "rotate", "renew-root", "show"])
    k.add_argument(
        "role",
        nargs="?",
        choices=["root", "targets", "snapshot", "timestamp"],
        help="the role whose key `rotate` replaces",
    )
    k.add_argument("--keys", type=Path, default=REPO / "keys", help="keys directory (keys/)")
    # No defaults here: a value given to another action than init is refused, not ignored.
    k.add_argument("--root-threshold", type=int, help="with init: root keys needed (1)")
    k.add_argument("--root-keys", type=int, help="with init: how many root keys (1)")
    k.set_defaults(func=cmd_keys, conflict=keys_conflict)
    pb = sub.add_parser(
        "publish",
        help="add a release to a channel of a TUF repository, change a channel's pin, or refresh",
    )
    pb.add_argument("release", nargs="?", type=Path, help="out/<image>/<version>")
    pb.add_argument("--repo", type=Path, required=True, help="repository directory")
    pb.add_argument("--keys", type=Path, default=REPO / "keys")
    pb.add_argument("--channel", help=f"the channel to publish into or pin ({DEFAULT_CHANNEL})")
    pb.add_argument("--now", action="store_true", help="open every wave at once")
    pb.add_argument(
        "--max-version",
        type=version_argument,
        help="no machine in the channel goes above this version",
    )
    pb.add_argument("--no-max-version", action="store_true", help="lift the channel's pin")
    pb.add_argument("--refresh", action="store_true", help="re-sign expiring metadata only")
    pb.add_argument("--timestamp-only", action="store_true", help="with --refresh")
    pb.set_defaults(func=cmd_publish, conflict=publish_conflict)
    pl = sub.add_parser("pull", help="withdraw a release: no machine installs it")
    pl.add_argument("version", type=version_argument)
    pl.add_argument("--repo", type=Path, required=True)
    pl.add_argument("--keys", type=Path, default=REPO / "keys")
    pl.add_argument("--channel", default="stable")
    pl.add_argument("--image", help="only this image's release of that version")
    pl.add_argument("--undo", action="store_true", help="put a pulled release back")
    pl.set_defaults(func=cmd_pull)
    ls = sub.add_parser("list", help="list image definitions")
    ls.set_defaults(func=cmd_list)
    t = sub.add_parser("test", help="ruff, mypy and the whole pytest suite (VM tests included)")
    t.add_argument(
        "--slow", action="store_true", help="also run the slow VM scenarios (20 power cuts, ...)"
    )
    t.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra pytest arguments")
    t.set_defaults(func=cmd_test)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv if argv is not None else sys.argv[1:])
    if args.command is None:
        args = p.parse_args(["build"])
    conflict = getattr(args, "conflict", None)
    if conflict is not None and (problem := conflict(args)) is not None:
        p.error(f"{args.command}: {problem}")  # exits 2, as argparse does for any usage error
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
