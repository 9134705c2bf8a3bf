"""`./build.py keys`, `publish` and `pull`: the TUF keys and repository (builder/publish/)."""

from __future__ import annotations

import argparse

from builder import publish
from builder.errors import BuildError
from builder.log import log
from builder.publish import PublishResult


def cmd_keys(args: argparse.Namespace) -> int:
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


def cmd_publish(args: argparse.Namespace) -> int:
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


def cmd_pull(args: argparse.Namespace) -> int:
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
