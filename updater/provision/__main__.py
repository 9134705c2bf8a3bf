"""`berth-provision`: find this machine's first-boot config and apply it, once.

Run by berth-provision.service on every boot until it has succeeded once; the stamp it leaves on
STATE (`/var/lib/berth/provisioned`) skips it afterwards. sshd requires the service, so a config
that cannot be read or applied stops the boot before anyone can log in, with the reason on the
console and in the journal; the next boot tries again. `--check FILE` validates a config anywhere
(a build host included) without applying it; `--root DIR` adds every check of a real apply
against the tree at DIR.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from updater.files import write_file_atomic
from updater.provision.apply import apply_plan, describe, prepare, run_commands
from updater.provision.plan import HOSTNAME, Plan, ProvisionError, add_user_keys

if TYPE_CHECKING:
    from updater.provision.sources import Platform, SourceEnv

STAMP = "/var/lib/berth/provisioned"
ROOT_KEYS_CREDENTIAL = "ssh.authorized_keys.root"


def parse_config(data: bytes, source: str) -> Plan | None:
    """An Ignition config or a user-data (cloud-config, script) as a Plan; None when empty."""
    # Imported here: the Ignition parser pulls in requests, which a cloud-config does not need.
    from updater.provision.cloudconfig import classify, decompress, parse_user_data

    if classify(data, source) == "ignition":
        from updater.provision.ignition import parse_ignition

        # Clouds allow gzip'd user-data; the Ignition parser wants the JSON itself.
        return parse_ignition(decompress(data, source), source)
    return parse_user_data(data, source)


def _with_meta_hostname(plan: Plan, meta: dict[str, str]) -> Plan:
    """A NoCloud/config-2 drive or a metadata service may name the host when the config does not."""
    if plan.hostname is not None or any(f.path == "/etc/hostname" for f in plan.files):
        return plan  # the config names the host, or writes /etc/hostname itself
    name = (meta.get("local-hostname") or meta.get("hostname") or "").split(".")[0]
    if not HOSTNAME.fullmatch(name):
        return plan
    return dataclasses.replace(plan, hostname=name, hostname_where="the platform's meta-data")


def _write_stamp(root: Path, record: dict[str, str]) -> None:
    stamp = root / STAMP.lstrip("/")
    stamp.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(stamp, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def _say(message: str) -> None:
    print(f"berth-provision: {message}", flush=True)


def _nobody_can_log_in(root: Path) -> str:
    keys = root / "root/.ssh/authorized_keys"
    if keys.is_file() and keys.read_bytes().strip():  # bytes: any encoding is someone's key
        return "root logs in with the SSH keys already in /root/.ssh/authorized_keys"
    return (
        "nobody can log in: no account has a password or an SSH key. Give this machine an "
        "Ignition config or a #cloud-config (see docs/provisioning.md), or root's key as the "
        f"systemd credential {ROOT_KEYS_CREDENTIAL}"
    )


def provision(
    root: Path = Path("/"), *, env: SourceEnv | None = None, platform: Platform | None = None
) -> int:
    """Find the config and the platform's key pair, apply them onto `root`, leave the stamp.
    `env` and `platform` (default: the machine's, detected) are for tests."""
    from updater.provision.sources import (
        DEFAULT_ENV,
        DEFAULT_USER,
        detect_platform,
        find_platform_keys,
        find_user_data,
    )

    env = env or DEFAULT_ENV
    cmdline = Path("/proc/cmdline").read_text() if root == Path("/") else ""
    platform = platform or detect_platform(cmdline)
    _say(f"platform {platform}; looking for a config")
    found = find_user_data(platform, env=env)
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "platform": platform}
    for note in found.notes if found is not None else ():
        _say(note)
    plan = parse_config(found.data, found.source) if found is not None else None
    # The key pair the machine was launched with logs in as core, config or not, as on every
    # cloud image; a config's own keys for core come first.
    keys = find_platform_keys(platform, env=env)
    for note in keys.notes if keys is not None else ():
        _say(note)
    if plan is None and keys is None:
        if found is None:
            _say(f"no config found on {platform}; {_nobody_can_log_in(root)}")
            _write_stamp(root, {**record, "result": "no config"})
        else:
            _say(f"{found.source} is empty; {_nobody_can_log_in(root)}")
            _write_stamp(root, {**record, "source": found.source, "result": "empty config"})
        _check_in(platform)
        return 0
    if keys is not None:
        plan = add_user_keys(plan, DEFAULT_USER, keys.keys, keys.source)
        record["keys"] = f"{len(keys.keys)} for {DEFAULT_USER} from {keys.source}"
    assert plan is not None  # a config, a key pair or both
    if found is not None:
        plan = _with_meta_hostname(plan, dict(found.meta))
    _say(f"applying {plan.source}")
    applied = apply_plan(plan, root)
    _say(f"applied: {describe(applied)}")
    record |= {"source": plan.source, "format": plan.format, "result": "applied"}
    if found is not None:
        record["sha256"] = hashlib.sha256(found.data).hexdigest()
    # The stamp goes down before commands run: they run once, like cloud-init's runcmd, even if
    # one fails (a half-run command cannot be rolled back, and running it again could be worse).
    _write_stamp(root, record)
    try:
        run_commands(plan, root)
    except ProvisionError as e:
        _write_stamp(root, {**record, "result": f"applied; {e}"})
        raise
    _check_in(platform)
    return 0


def _check_in(platform: str) -> None:
    """Tell a cloud that needs to hear it that the machine is up (Azure: "Ready").

    A failed report is printed, not fatal: the machine is provisioned and runs; only the
    cloud's view of the deployment suffers."""
    if platform != "azure":
        return
    from updater.provision.azure import report_ready

    try:
        report_ready()
        _say("reported Ready to the Azure fabric")
    except ProvisionError as e:
        _say(f"could not report Ready to the Azure fabric: {e}")


def check(path: Path, root: Path | None = None, *, show_secrets: bool = False) -> int:
    """Validate the config at `path`; with `root`, also stage it onto the tree there, making
    every check apply makes, and discard it again (the tree is left as it was)."""
    from updater.provision.sources import read_config_file

    plan = parse_config(read_config_file(path, str(path)), str(path))
    if plan is None:
        print(f"{path}: empty: nothing to apply")
        return 0
    if root is not None:
        prepared = prepare(plan, root)
        prepared.discard()
        print(f"{plan.source}: applies to {root}: {'; '.join(prepared.summary) or 'no change'}")
    print(f"{plan.source}: valid {plan.format}")
    for note in plan.notes:
        print(f"{plan.source}: {note}")
    shown = dataclasses.asdict(plan)
    if not show_secrets:
        _redact(shown)
    print(json.dumps(shown, indent=2, default=_json_default))
    return 0


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return f"<{len(value)} bytes>"
    raise TypeError(type(value).__name__)


REDACTED = "<redacted>"


def _redact(plan: dict[str, Any]) -> None:
    """Password hashes and file contents out of --check's output (it goes to terminals, logs and
    CI output): sizes and hashes tell two configs apart well enough."""
    for user in plan["users"]:
        if user["password_hash"] is not None:
            user["password_hash"] = REDACTED
    for entry in [*plan["files"], *plan["units"]] + [
        d for u in plan["units"] for d in u["dropins"]
    ]:
        if entry["contents"] is not None:
            entry["contents"] = _digest(entry["contents"])
    if plan["script"] is not None:
        plan["script"] = _digest(plan["script"])


def _digest(value: str | bytes) -> str:
    data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    return f"{REDACTED} {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="berth-provision",
        description="Apply this machine's first-boot config (Ignition or cloud-config) once.",
    )
    parser.add_argument("--check", type=Path, metavar="FILE", help="validate FILE, apply nothing")
    parser.add_argument(
        "--root",
        type=Path,
        metavar="DIR",
        help="with --check: also make every check of a real apply against the tree at DIR "
        "(staged there and removed again)",
    )
    parser.add_argument(
        "--show-secrets",
        action="store_true",
        help="with --check: print password hashes and file contents (redacted by default)",
    )
    parser.add_argument(
        "--force", action="store_true", help="run even though the machine was provisioned"
    )
    args = parser.parse_args(argv)
    if (args.root or args.show_secrets) and not args.check:
        parser.error("--root and --show-secrets go with --check")
    try:
        if args.check:
            return check(args.check, args.root, show_secrets=args.show_secrets)
        if Path(STAMP).exists() and not args.force:
            _say(f"already provisioned (see {STAMP}); --force runs it again")
            return 0
        return provision()
    except (ProvisionError, OSError) as e:
        _say(f"FAILED: {e}")
        if not args.check:
            _say(
                "the boot stops here: sshd and network services do not start. Fix the config "
                "and reboot; nothing of it was applied unless listed above."
            )
        return 1


if __name__ == "__main__":
    sys.exit(main())
