"""berth-update: the operator's front end to the update agent.

    berth-update status [--json]
    berth-update check [--ignore-waves] [--no-wait]
    berth-update apply [--version V] [--allow-downgrade] [--ignore-waves] [--no-wait]
    berth-update rollback [--no-wait]
    berth-update after-boot [--no-wait]
    berth-update check-entries [--no-wait]
                                  (berth-boot-check.service, as the machine stops) set aside
                                  boot entries the firmware would refuse
    berth-update daemon           (berth-update.service)
    berth-update health           (berth-health.service, before boot-complete.target)
    berth-update lock id|show|release ID|slots N [--etcd URL] [--group G]
                                  the reboot semaphore in etcd (strategies etcd-lock, fleet-lock
                                  with berth-lockd or airlock); works on any host with Python

The only place that turns errors into exit codes: any UpdateError becomes one line
"berth-update: <message>" on stderr and exit status 1. The agent is built from the running
machine (`Machine.detect()`) and the configuration files; tests inject their own agent.

The commands that change anything wait for the agent's lock while another actor (the daemon's
worker, another berth-update) holds it, saying whom they wait for; `--no-wait` ends at once
instead, with exit status 1 and the holder named (update/lock.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from updater.config import DEFAULT_GROUP, ConfigError, UpdateConfig, load_config
from updater.errors import RefusedError, UpdateError
from updater.release.packages import change_lines
from updater.release.version import version_argument
from updater.update.machine import Machine

if TYPE_CHECKING:
    from updater.agent import Agent, Status
    from updater.reboot.semaphore import SemaphoreClient
    from updater.service.daemon import Daemon
    from updater.service.health import HealthCheck

# The agent (requests, python-tuf, cryptography) is imported only by the commands that use it:
# `berth-update daemon` must start without it (see updater/service/worker.py).

PROG = "berth-update"
MACHINE_ID = Path("/etc/machine-id")


def default_agent() -> Agent:
    from updater.agent import Agent

    return Agent(Machine.detect(), load_config())


def default_daemon() -> Daemon:
    from updater.service.daemon import ConfigPaths, Daemon, initial_config

    paths = ConfigPaths()
    return Daemon(Machine.detect(), initial_config(paths), paths=paths)


def default_health() -> HealthCheck:
    from updater.agent import Actor, Agent
    from updater.service.health import HealthCheck

    try:
        config = load_config()
    except ConfigError as e:
        # The configuration only names the repository; the boot is judged without it.
        logging.getLogger(__name__).warning("%s", e)
        config = UpdateConfig(url="", channel="stable")
    return HealthCheck(Agent(Machine.detect(), config, actor=Actor("berth-update health")))


class _JournalFormatter(logging.Formatter):
    """Prefixes <priority> so journald stores errors as errors (SyslogLevelPrefix=yes)."""

    def format(self, record: logging.LogRecord) -> str:
        priority = 3 if record.levelno >= logging.ERROR else 4 if record.levelno >= 30 else 6
        return f"<{priority}>{super().format(record)}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Berth's update agent.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the agent does")
    sub = p.add_subparsers(dest="command", required=True)
    # The commands that change slots, the ESP or the state, and so take the agent's lock.
    locking = argparse.ArgumentParser(add_help=False)
    locking.add_argument(
        "--no-wait",
        action="store_true",
        help="when another berth-update or the daemon is at work, end at once (status 1)",
    )
    status = sub.add_parser("status", help="booted version, slots, channel, last check")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    check = sub.add_parser(
        "check", parents=[locking], help="look for an update in the signed channel"
    )
    check.add_argument("--ignore-waves", action="store_true", help="do not wait for this wave")
    apply = sub.add_parser(
        "apply", parents=[locking], help="install an update into the inactive slot"
    )
    apply.add_argument("--version", type=version_argument, help="install this version")
    apply.add_argument(
        "--allow-downgrade", action="store_true", help="allow --version older than the booted one"
    )
    apply.add_argument("--ignore-waves", action="store_true", help="do not wait for this wave")
    sub.add_parser("rollback", parents=[locking], help="boot the previous version next")
    sub.add_parser(
        "after-boot", parents=[locking], help="judge this boot (run once per boot by systemd)"
    )
    sub.add_parser(
        "check-entries",
        parents=[locking],
        help="with Secure Boot on, set aside boot entries the firmware would refuse",
    )
    revert = sub.add_parser(
        "etc-revert",
        help="make /etc files follow the image again: the machine's copies go at the next boot",
    )
    revert.add_argument("paths", nargs="+", metavar="PATH", help="a file or directory in /etc")
    revert.add_argument("--var", type=Path, default=Path("/var"), help=argparse.SUPPRESS)
    sub.add_parser("daemon", help="check, install and reboot at the interval (systemd service)")
    sub.add_parser("health", help="judge this boot's health before boot-complete.target")
    lock = sub.add_parser("lock", help="the fleet's reboot semaphore in etcd (operators)")
    lock.add_argument(
        "--etcd",
        action="extend",
        type=lambda t: [e for e in t.split(",") if e],
        help="etcd URL(s); default: [etcd_lock] endpoints of this machine's configuration",
    )
    lock.add_argument("--group", help=f"reboot group (default: configured or {DEFAULT_GROUP})")
    lock.add_argument("--ca-file", type=Path)
    lock.add_argument("--cert-file", type=Path)
    lock.add_argument("--key-file", type=Path)
    action = lock.add_subparsers(dest="action", required=True)
    action.add_parser("id", help="this machine's holder id")
    show = action.add_parser("show", help="slots and holders")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    release = action.add_parser("release", help="free the slot of a dead or removed machine")
    release.add_argument("holder", help="the holder id, as `show` lists it")
    slots = action.add_parser("slots", help="change the number of slots")
    slots.add_argument("count", type=int)
    return p


def format_status(status: Status) -> str:
    lines = [
        f"booted:       {status.image} {status.booted_version} ({status.arch})",
        *(
            f"slot {s.name}:       {s.version or '-'} {s.state}"
            + (f" roothash {s.roothash}" if s.roothash else "")
            for s in status.slots
        ),
        f"channel:      {status.channel} from {status.url}",
        f"strategy:     {status.strategy}, checking every {status.interval:.0f} s",
        f"seed:         {status.seed}",
        f"last check:   {status.last_check or 'never'}"
        + (f": {status.last_result}" if status.last_result else ""),
        f"pending:      {status.pending or 'none'}",
    ]
    lines.extend(f"              {line}" for line in status.pending_changes)
    if status.reboot_held:
        lines.append(f"reboot waits: {status.reboot_held}")
    if status.busy:
        lines.append(f"busy:         {status.busy}")
    if status.rollback_note:
        lines.append(f"rollback:     {status.rollback_note}")
    lines.extend(f"bad:          {b}" for b in status.bad)
    lines.extend(
        f"/etc drift:   {path} (changed here and by this release)" for path in status.etc_drift
    )
    lines.extend(f"transfer:     {t}" for t in status.transfers)
    lines.append(f"boot entries: {', '.join(status.boot_entries) or 'none'}")
    lines.append(f"secure boot:  {status.secure_boot} (kernel lockdown: {status.lockdown})")
    lines.append(f"state:        {status.state_encryption}")
    lines.append(f"tpm:          {status.tpm}")
    return "\n".join(lines) + "\n"


def _semaphore(
    args: argparse.Namespace, config_factory: Callable[[], UpdateConfig]
) -> SemaphoreClient:
    """The semaphore named on the command line, else the one this machine's strategy uses."""
    from updater.reboot.etcdlock import EtcdStore, TLSFiles
    from updater.reboot.semaphore import SemaphoreClient

    config: UpdateConfig | None = None
    if not args.etcd or args.group is None:
        try:
            config = config_factory()
        except ConfigError:
            config = None  # not a Berth machine, or a broken file: the options must say it all
    endpoints = args.etcd or (config.etcd_endpoints if config else ())
    if not endpoints:
        raise RefusedError(
            "no etcd endpoints: pass --etcd URL, or set [etcd_lock] endpoints in "
            "/etc/berth/update.toml"
        )
    group = args.group or (config.etcd_group if config else DEFAULT_GROUP)
    tls = TLSFiles(args.ca_file, args.cert_file, args.key_file)
    if not args.etcd and config is not None:
        tls = TLSFiles(config.etcd_ca_file, config.etcd_cert_file, config.etcd_key_file)
    return SemaphoreClient(EtcdStore(endpoints, tls), group)


def _lock(args: argparse.Namespace, config_factory: Callable[[], UpdateConfig], out: TextIO) -> int:
    from updater.reboot.gate import holder_id

    if args.action == "id":
        out.write(holder_id(MACHINE_ID) + "\n")
        return 0
    semaphore = _semaphore(args, config_factory)
    where = f"group {semaphore.group} ({semaphore.key})"
    if args.action == "show":
        current, exists = semaphore.show()
        if args.json:
            doc = {
                "group": semaphore.group,
                "key": semaphore.key,
                "exists": exists,
                "total_slots": current.total_slots,
                "holders": list(current.holders),
            }
            out.write(json.dumps(doc, indent=2) + "\n")
        elif not exists:
            out.write(f"{where}: no semaphore yet (created on the first lock)\n")
        else:
            out.write(f"{where}: {len(current.holders)} of {current.total_slots} slots held\n")
            out.writelines(f"  {holder}\n" for holder in current.holders)
    elif args.action == "release":
        outcome = semaphore.release(args.holder)
        if not outcome.changed:
            raise RefusedError(f"{args.holder} holds no slot in {where}")
        s = outcome.semaphore
        out.write(f"released {args.holder} in {where}: {len(s.holders)} of {s.total_slots} held\n")
    elif args.action == "slots":
        if args.count < 0:
            raise RefusedError(f"slots must be 0 or more, got {args.count}")
        before, _ = semaphore.show()
        s = semaphore.set_slots(args.count).semaphore
        out.write(
            f"{where}: {before.total_slots} -> {s.total_slots} slots, {len(s.holders)} held\n"
        )
    return 0


def _run(args: argparse.Namespace, agent: Agent, out: TextIO, err: TextIO) -> int:
    if getattr(args, "no_wait", None) is not None:
        from updater.agent import Actor

        def waiting(text: str) -> None:
            err.write(f"{PROG}: {text}\n")
            err.flush()

        agent.actor = Actor(f"{PROG} {args.command}", 0.0 if args.no_wait else None, waiting)
    if args.command == "status":
        status = agent.status()
        if args.json:
            out.write(json.dumps(status.to_json(), indent=2) + "\n")
        else:
            out.write(format_status(status))
    elif args.command == "check":
        selection = agent.check(ignore_waves=args.ignore_waves)
        if selection.release is not None:
            out.write(f"update available: {selection.release.version}\n")
            for line in change_lines(selection.release.changes):
                out.write(f"  {line}\n")
        else:
            out.write("no update available\n")
        for reason in selection.reasons:
            out.write(f"  skipped {reason}\n")
    elif args.command == "apply":
        from updater.progress import Progress

        progress = Progress(err)
        try:
            applied = agent.apply(
                args.version,
                allow_downgrade=args.allow_downgrade,
                ignore_waves=args.ignore_waves,
                progress=progress,
            )
        finally:
            progress.close()
        if applied.already:
            out.write(
                f"{applied.version} is already installed, pending reboot (slot {applied.slot}, "
                f"{applied.entry.name})\n"
            )
        else:
            out.write(
                f"installed {applied.version} into slot {applied.slot} ({applied.entry.name}); "
                "it boots at the next reboot\n"
            )
            if applied.transfer is not None:
                out.write(f"transfer: {applied.transfer.describe()}\n")
    elif args.command == "rollback":
        rolled = agent.rollback()
        out.write(
            f"{rolled.to_version} boots next (rolled back from {rolled.from_version}); reboot "
            "to use it\n"
        )
    elif args.command == "check-entries":
        for refused in agent.check_entries():
            out.write(f"set aside {refused.name}: {refused.reason}\n")
    elif args.command == "after-boot":
        result = agent.after_boot()
        for name in result.refused:
            out.write(f"set aside {name}: the firmware would refuse it (Secure Boot)\n")
        for reason in result.reasons:
            out.write(f"{reason}\n")
        for path in result.etc_drift:
            out.write(f"{path}: changed here and by {result.booted}; the local copy wins\n")
        if result.blessed is not None:
            out.write(f"{result.blessed} booted fine and is now the current version\n")
        elif result.waiting:
            out.write(f"{result.booted} booted; waiting for boot-complete to judge it\n")
        elif not result.reasons:
            out.write(f"{result.booted} booted; nothing to do\n")
    return 0


def main(
    argv: Sequence[str] | None = None,
    *,
    agent_factory: Callable[[], Agent] = default_agent,
    daemon_factory: Callable[[], Daemon] = default_daemon,
    health_factory: Callable[[], HealthCheck] = default_health,
    config_factory: Callable[[], UpdateConfig] = load_config,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = parser().parse_args(argv)
    service = args.command in ("daemon", "health")
    handler = logging.StreamHandler(err)
    if service and "JOURNAL_STREAM" in os.environ:
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    logging.basicConfig(
        level=logging.INFO if args.verbose or service else logging.WARNING, handlers=[handler]
    )
    try:
        if args.command == "daemon":
            daemon_factory().run()
            return 0
        if args.command == "health":
            failed = [r for r in health_factory().judge() if not r.ok]
            if failed:  # each failure is logged above with its detail
                err.write(f"{PROG}: health check failed: {', '.join(r.name for r in failed)}\n")
                return 1
            logging.getLogger(PROG).info("health check passed")
            return 0
        if args.command == "lock":
            return _lock(args, config_factory, out)
        if args.command == "etc-revert":
            from updater.update.etcdrift import schedule_revert

            try:
                listed = schedule_revert(args.var, args.paths)
            except ValueError as e:
                err.write(f"{PROG}: etc-revert: {e}\n")
                return 2
            for path in listed:
                out.write(f"/etc/{path}: the image's version comes back at the next boot\n")
            return 0
        return _run(args, agent_factory(), out, err)
    except UpdateError as e:
        err.write(f"{PROG}: {e}\n")
        return 1
    except KeyboardInterrupt:
        err.write(f"{PROG}: interrupted\n")
        return 130
