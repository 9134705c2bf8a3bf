"""Judging a boot: after one, notice a fallback (the newer version is marked bad, never installed
again automatically) or bless the pending version that booted fine (and prune entries older than
the fallback); reject a trial that failed its health check; roll back on the operator's word.

The boot loader decides what boots; this only reads its verdict (entry names with boot counters,
LoaderEntries) and renames entries on the ESP.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from updater.disk import bootentries, encryption, slots
from updater.errors import RefusedError
from updater.release.version import Version
from updater.update import bootcheck, etcdrift
from updater.update.context import Booted, Context
from updater.update.machine import write_reboot_required

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AfterBoot:
    booted: Version
    rolled_back_from: tuple[Version, ...] = ()
    reasons: tuple[str, ...] = ()
    blessed: Version | None = None  # the pending version that booted fine and is now current
    waiting: bool = False  # the pending version booted but is not blessed yet
    pruned: tuple[str, ...] = ()
    damaged: tuple[str, ...] = ()  # entries systemd-boot could not load: removed, to reinstall
    # entries the firmware would refuse (Secure Boot), set aside as <name>.refused (bootcheck.py)
    refused: tuple[str, ...] = ()
    # /etc files this machine changed that the booted release changed too (update/etcdrift.py)
    etc_drift: tuple[str, ...] = ()


@dataclass(frozen=True)
class RolledBack:
    from_version: Version
    to_version: Version
    renamed: tuple[tuple[str, str], ...]


def after_boot(ctx: Context) -> AfterBoot:
    """Judge the boot that just happened: a fallback marks the newer version bad; a good boot of
    the pending version makes it current and prunes UKIs older than the previous."""
    booted = ctx.booted()
    esp = ctx.machine.esp
    state = replace(ctx.load_state(), last_booted=booted.version)
    boot_id = ctx.boot_id()
    # Before the judging: an entry the firmware refuses was never tried, so it is no fallback.
    refused = bootcheck.set_aside_refused(esp, ctx.machine.efivars, booted.version)
    entries = bootentries.list_entries(esp)
    loaded = bootentries.loaded_versions(ctx.machine.loader_entries)
    unlock = encryption.unlock_failure(ctx.machine.efivars)
    rolled: list[Version] = []
    reasons: list[str] = []
    damaged: list[str] = []
    for version in sorted({e.version for e in entries if e.version > booted.version}):
        if version in state.bad_versions:
            continue  # judged before (or rejected by the operator): keep that reason
        pending = state.pending
        if pending is not None and pending.version == version and pending.boot_id == boot_id:
            continue  # installed during this very boot: not tried yet
        mine = [e for e in entries if e.version == version]
        if loaded is not None and version not in loaded:
            # systemd-boot could not load the file (a power cut left it incomplete, say): the
            # boot loader never chose against it, so this is no rollback. Without its entry the
            # version is not installed; the next check installs it again.
            names = [p.name for p in bootentries.remove_entries(esp, version)]
            log.warning(
                "the boot loader could not load %s, so %s was not tried; removed it, and "
                "%s will be installed again",
                ", ".join(names),
                version,
                version,
            )
            if pending is not None and pending.version == version:
                state = replace(state, pending=None)
            damaged.extend(names)
            continue
        if unlock is not None and unlock.version == str(version):
            # Its initrd said why before it failed (disk/encryption.py): that beats "ran out".
            why = f"STATE could not be unlocked: {unlock.reason}"
        elif any(e.state is bootentries.EntryState.BAD for e in mine):
            why = (
                "boot did not complete (its boot counter ran out; the health check "
                "results of those boots are not available to the agent)"
            )
        elif any(e.state is bootentries.EntryState.INDETERMINATE for e in mine):
            left = max(e.tries_left or 0 for e in mine)
            why = (
                f"the boot loader started {booted.version} while {version} still had "
                f"{left} tries left (chosen in the boot menu)"
            )
        else:
            why = (
                f"the boot loader started {booted.version} although {version} had booted "
                "fine before (chosen in the boot menu)"
            )
        reason = f"rolled back from {version}: {why}"
        log.warning("%s; it is marked bad and not installed again automatically", reason)
        bootentries.mark_bad(esp, version)
        state = state.with_bad(version, reason, ctx.now())
        if pending is not None and pending.version == version:
            state = replace(state, pending=None)
        rolled.append(version)
        reasons.append(reason)

    blessed: Version | None = None
    waiting = False
    pruned: list[str] = []
    pending = state.pending
    if pending is not None and pending.version == booted.version:
        mine = [e for e in bootentries.list_entries(esp) if e.version == booted.version]
        if mine and all(e.state is bootentries.EntryState.GOOD for e in mine):
            blessed = booted.version
            state = replace(state, pending=None)
            pruned = prune(ctx, booted)
        else:
            waiting = True  # systemd-bless-boot has not run yet: judge on a later call
    ctx.save_state(state)
    if unlock is not None:
        # Recorded above (or about a version judged before): the variable has done its job.
        encryption.clear_unlock_failure(ctx.machine.efivars)
    machine = ctx.machine
    return AfterBoot(
        booted.version,
        tuple(rolled),
        tuple(reasons),
        blessed,
        waiting,
        tuple(pruned),
        tuple(damaged),
        tuple(r.name for r in refused),
        etcdrift.report(machine.state_dir, machine.etc_list, machine.etc_upper, booted.version),
    )


def prune(ctx: Context, booted: Booted) -> list[str]:
    """Remove the entries older than the fallback (the other slot's version, when older)."""
    other = slots.inactive_slot(ctx.slot_pair(), booted.roothash)
    previous = other.version if other.state is slots.SlotState.INSTALLED else None
    floor = previous if previous is not None and previous < booted.version else booted.version
    esp = ctx.machine.esp
    keep = {e.version for e in bootentries.list_entries(esp) if e.version >= floor}
    return [p.name for p in bootentries.prune(esp, keep)]


def reject_trial(ctx: Context, reason: str) -> Version | None:
    """The booted version, on trial, failed its health check: mark it bad now.

    Its entries get zero tries left, so the next boot is the previous version (rather than this
    one again until the counter runs out), and the reason is recorded where status and after-boot
    find it. Returns the rejected version, or None when the booted entry is blessed (a failing
    check on a blessed boot changes nothing; it is only logged).
    """
    booted = ctx.booted()
    esp = ctx.machine.esp
    mine = [e for e in bootentries.list_entries(esp) if e.version == booted.version]
    if not any(e.state is bootentries.EntryState.INDETERMINATE for e in mine):
        return None
    bootentries.mark_bad(esp, booted.version)
    state = ctx.load_state().with_bad(
        booted.version, f"rolled back from {booted.version}: {reason}", ctx.now()
    )
    if state.pending is not None and state.pending.version == booted.version:
        state = replace(state, pending=None)
    ctx.save_state(state)
    return booted.version


def rollback(ctx: Context) -> RolledBack:
    """Boot the previous version (the other slot) next, by the operator's choice."""
    booted = ctx.booted()
    esp = ctx.machine.esp
    other = slots.inactive_slot(ctx.slot_pair(), booted.roothash)
    previous = other.version
    if other.state is not slots.SlotState.INSTALLED or previous is None:
        raise RefusedError(
            f"refused to roll back: slot {other.name} is {other.state}, there is no previous "
            "version to go back to"
        )
    pending = ctx.load_state().pending
    if previous >= booted.version:
        if pending is not None and (pending.slot, pending.version) == (str(other.name), previous):
            # An apply (perhaps the one this rollback waited for) wrote an update over the
            # version there was to go back to.
            raise RefusedError(
                f"refused to roll back: slot {other.name} now holds the update {previous}, "
                "installed and waiting for its reboot; the version it held before is gone, so "
                "there is no previous version to go back to"
            )
        raise RefusedError(
            f"refused to roll back: slot {other.name} holds {previous}, which is not older "
            f"than the booted {booted.version} (install it with apply --version {previous})"
        )
    if previous not in {e.version for e in bootentries.list_entries(esp)}:
        raise RefusedError(f"refused to roll back to {previous}: its UKI is not on the ESP {esp}")
    renamed = bootentries.set_next_boot(esp, previous)
    state = ctx.load_state().with_bad(booted.version, "rolled back by the operator", ctx.now())
    ctx.save_state(state)
    write_reboot_required(ctx.machine)
    return RolledBack(booted.version, previous, tuple((a.name, b.name) for a, b in renamed))
