"""`./build.py keys`, `publish` and `pull`: the TUF keys and repository (builder/publish/).

A flag that would have no effect in the mode chosen, or that contradicts another, is refused
before anything runs (`keys_conflict`, `publish_conflict`): nothing is silently ignored.
"""

from __future__ import annotations

import argparse

from builder import publish, signing
from builder.log import log
from builder.publish import PublishResult, pcrkey, secureboot
from updater.release.packages import change_lines

DEFAULT_CHANNEL = "stable"
DEFAULT_ROOT_KEYS = 1
DEFAULT_ROOT_THRESHOLD = 1


def _listed(flags: list[str]) -> str:
    return flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])} and {flags[-1]}"


def _have(flags: list[str]) -> str:
    return "has" if len(flags) == 1 else "have"


def keys_conflict(args: argparse.Namespace) -> str | None:
    """Why these `keys` arguments are refused, or None."""
    if args.action == "rotate" and args.role is None:
        return (
            "keys rotate needs the role whose key it replaces: root, targets, snapshot or timestamp"
        )
    if args.action != "rotate" and args.role is not None:
        return (
            f"the role {args.role} has no effect with keys {args.action}: "
            "only keys rotate takes one"
        )
    init_only = [
        flag
        for flag, value in (
            ("--root-threshold", args.root_threshold),
            ("--root-keys", args.root_keys),
        )
        if value is not None
    ]
    if args.action != "init" and init_only:
        return (
            f"{_listed(init_only)} {_have(init_only)} no effect with keys {args.action}: only "
            "keys init takes them"
        )
    return None


def publish_conflict(args: argparse.Namespace) -> str | None:
    """Why these `publish` arguments are refused, or None."""
    if args.max_version is not None and args.no_max_version:
        return (
            f"--max-version {args.max_version} and --no-max-version contradict each other: give one"
        )
    given = [
        flag
        for flag, value in (
            (f"the release directory {args.release}", args.release is not None),
            ("--channel", args.channel is not None),
            ("--now", args.now),
            ("--max-version", args.max_version is not None),
            ("--no-max-version", args.no_max_version),
        )
        if value
    ]
    if args.refresh:
        if given:
            return (
                f"{_listed(given)} {_have(given)} no effect with --refresh, which re-signs the "
                "repository as it is: publish and refresh separately"
            )
        return None
    if args.timestamp_only:
        return "--timestamp-only has no effect without --refresh"
    if args.release is None:
        if args.now:
            return "--now has no effect without a release directory: it opens the release's waves"
        if args.max_version is None and not args.no_max_version:
            return (
                "publish needs a release directory (out/<image>/<version>), --refresh, or "
                "--max-version/--no-max-version to change a channel's pin alone"
            )
    return None


def cmd_keys(args: argparse.Namespace) -> int:
    if args.action == "init":
        _init_keys(args)
    elif args.action == "rotate":
        publish.rotate_key(args.keys, args.role)
        log(f"Rotated the {args.role} key; publish or refresh to re-sign with it.")
    elif args.action == "renew-root":
        publish.renew_root(args.keys)
        log("Signed a new root version with a fresh expiry.")
    else:
        for role, info in publish.describe_keys(args.keys).items():
            print(f"{role:<10} {info}")
        described = secureboot.describe_secureboot_keys(args.keys)
        if not described:
            print("secure boot: no keys (./build.py keys init makes them)")
        for key in described:
            print(f"secure boot {key.name:<4} {key.describe()}")
        if described:
            print(f"enrolment   {signing.describe_enrolment(args.keys)}")
        pcr = pcrkey.describe_pcr_key(args.keys)
        if pcr is None:
            print("pcr key    none (./build.py keys init makes it)")
        else:
            print(f"pcr key    {pcr.describe()}")
    return 0


def _init_keys(args: argparse.Namespace) -> None:
    """Make what the keys directory lacks of the TUF keys and the Secure Boot keys; a directory
    that has both is refused (keys are never overwritten)."""
    has_tuf = publish.has_keys(args.keys)
    has_secureboot = secureboot.has_secureboot_keys(args.keys)
    has_pcr = pcrkey.has_pcr_key(args.keys)
    if has_tuf and has_secureboot and has_pcr:
        raise publish.PublishError(
            f"{args.keys} already holds TUF, Secure Boot and PCR keys",
            hint="keys are never overwritten; choose another directory or rotate a key instead",
        )
    if has_tuf and (args.root_keys is not None or args.root_threshold is not None):
        raise publish.PublishError(
            f"{args.keys} already holds TUF keys: --root-keys and --root-threshold apply only "
            "when they are made",
            hint="drop them to add the missing Secure Boot or PCR keys",
        )
    if not has_tuf:
        root_keys = DEFAULT_ROOT_KEYS if args.root_keys is None else args.root_keys
        threshold = DEFAULT_ROOT_THRESHOLD if args.root_threshold is None else args.root_threshold
        publish.init_keys(args.keys, root_threshold=threshold, root_keys=root_keys)
        log(
            f"Created TUF keys in {args.keys}/ (root: {root_keys} key(s), threshold "
            f"{threshold}). Move root-*.pem offline: see docs/updates.md."
        )
    if not has_secureboot:
        made = secureboot.init_secureboot_keys(args.keys)
        kept = [name for name in secureboot.NAMES if name not in made]
        log(
            f"Created Secure Boot keys in {secureboot.secureboot_dir(args.keys)}/ "
            f"({', '.join(made)}{'; kept ' + ', '.join(kept) if kept else ''}). Keep PK.key and "
            "KEK.key offline: see docs/updates.md."
        )
        # While PK.key and KEK.key are still here: every later build puts these on the ESP.
        if signing.secureboot_enrolment(args.keys) is not None:
            log(
                "Wrote the enrolment files PK.auth, KEK.auth and db.auth there: machines in "
                "setup mode enrol them from the ESP."
            )

    if not has_pcr and pcrkey.init_pcr_key(args.keys):
        log(
            f"Created the PCR key in {pcrkey.pcr_dir(args.keys)}/: every UKI carries PCR 11 "
            "predictions signed with it, and machines unlock STATE only for those. Keep "
            f"{pcrkey.PRIVATE} safe: see docs/security.md."
        )


def _print_result(result: PublishResult) -> None:
    log("repository changed" if result.changed else "repository unchanged (already published)")
    log(
        f"metadata versions: targets {result.targets_version}, snapshot "
        f"{result.snapshot_version}, timestamp {result.timestamp_version}"
    )
    for role, when in sorted(result.expires.items()):
        log(f"{role} expires {when:%Y-%m-%d %H:%M} UTC")
    # The summary, then one indented line per package (the agent's check prints the same).
    for number, line in enumerate(change_lines(result.changes)):
        log(line if number == 0 else f"  {line}")


def cmd_publish(args: argparse.Namespace) -> int:
    channel = args.channel or DEFAULT_CHANNEL
    if args.refresh:
        result = publish.refresh(args.repo, args.keys, timestamp_only=args.timestamp_only)
    elif args.release is None:
        result = publish.set_max_version(args.repo, args.keys, channel, args.max_version)
    else:
        # The pin changes in the same signed change as the release: both happen, or neither.
        result = publish.publish(
            args.release,
            args.repo,
            args.keys,
            channel,
            immediate=args.now,
            max_version=args.max_version,
            lift_max_version=args.no_max_version,
        )
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
