"""What `berth-update status` shows: what this machine runs, what each slot holds, what the agent
last did, who holds the agent's lock. No network, no writes, no lock: an operator runs status
while the daemon works (it shows "busy: ..." then), and a status that saved what it had read
could put back a state from before the daemon's last save (a pending record lost, a bad mark
undone).

So the seed is computed, never saved (the next check saves it), and a corrupt state file is read
as an empty state and left for the next check or apply to move aside. A machine without a usable
/etc/machine-id and without a saved seed shows a seed drawn for this call only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from updater.config import Strategy
from updater.disk import bootentries, encryption, firmware, slots
from updater.release.version import Version
from updater.update import choose, etcdrift
from updater.update.context import Context
from updater.update.lock import read_holder


class SlotRole(StrEnum):
    BOOTED = "booted"  # the running root
    PREVIOUS = "previous"  # an installed version to go back to
    PENDING = "pending"  # installed, boots at the next reboot
    BAD = "bad"  # installed but failed (or rejected) on this machine
    EMPTY = "empty"  # never written
    WRITING = "writing"  # an update was interrupted: scratch
    UNKNOWN = "unknown"  # labels Berth does not write: scratch


@dataclass(frozen=True)
class SlotStatus:
    name: str
    version: str | None
    roothash: str | None
    state: SlotRole


@dataclass(frozen=True)
class Status:
    image: str
    arch: str
    booted_version: str
    slots: tuple[SlotStatus, ...]
    channel: str
    url: str
    strategy: Strategy
    interval: float
    seed: int
    last_check: str | None  # RFC 3339
    last_result: str | None
    pending: str | None
    bad: tuple[str, ...]  # "1.3.0: rolled back from 1.3.0: boot did not complete"
    rollback_note: str | None
    boot_entries: tuple[str, ...]  # ESP entries in boot order
    # Who holds the agent's lock and what it does, as its holder file says (update/lock.py)
    busy: str | None = None
    # Why the daemon's reboot into the pending update waits, while that update is pending:
    # "hook 50-drain: exit status 1: ... (since ...; retrying at ...)"
    reboot_held: str | None = None
    # What the pending update changes in the packages (summary line first), as the channel said.
    pending_changes: tuple[str, ...] = ()
    # /etc files this machine changed that the booted release changed too: they hide its version.
    etc_drift: tuple[str, ...] = ()
    # The newest installs, newest last: "2.0.0: fetched 3.1 MB, reused 181.2 MB (98% reused) in
    # 14 requests"
    transfers: tuple[str, ...] = ()
    # What the firmware says of Secure Boot ("enabled", "setup mode", ...), and the kernel's
    # lockdown mode ("integrity", "none", ...): disk/firmware.py.
    secure_boot: str = str(firmware.SecureBoot.NOT_UEFI)
    lockdown: str = "unknown"
    # STATE: "LUKS2, unlocked by the TPM: ...", "not encrypted (no TPM 2.0 at first boot)";
    # and the TPM the kernel found ("TPM 2.0", "none"): disk/encryption.py.
    state_encryption: str = "unknown (this boot's initrd left no report)"
    state_encrypted: bool | None = None
    state_binding: str = "none"
    tpm: str = "none"

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["slots"] = [{**asdict(s), "state": str(s.state)} for s in self.slots]
        doc["strategy"] = str(self.strategy)
        doc["bad"] = list(self.bad)
        doc["boot_entries"] = list(self.boot_entries)
        doc["pending_changes"] = list(self.pending_changes)
        doc["etc_drift"] = list(self.etc_drift)
        doc["transfers"] = list(self.transfers)
        return doc


def read_status(ctx: Context) -> Status:
    """What this machine runs, what each slot holds, what the agent last did; reads only."""
    # Read first: while another actor works, what follows may show its work half done.
    holder = read_holder(ctx.machine.lock_dir)
    state = ctx.read_state()
    booted = ctx.booted()
    seed, _ = choose.seed(ctx, state)
    slot_list = []
    for slot in ctx.slot_pair():
        version = slot.version
        if slot.roothash == booted.roothash:
            role = SlotRole.BOOTED
        elif slot.state is slots.SlotState.EMPTY:
            role = SlotRole.EMPTY
        elif slot.state is slots.SlotState.WRITING:
            role = SlotRole.WRITING
        elif version is None:
            role = SlotRole.UNKNOWN
        elif version in state.bad_versions:
            role = SlotRole.BAD
        elif state.pending is not None and state.pending.version == version:
            role = SlotRole.PENDING
        else:
            role = SlotRole.PREVIOUS
        installed = slot.state is slots.SlotState.INSTALLED
        slot_list.append(
            SlotStatus(
                str(slot.name),
                None if version is None else str(version),
                slot.roothash if installed else None,
                role,
            )
        )
    rolled = [b for b in state.bad if b.reason.startswith("rolled back")]
    note = max(rolled, key=lambda b: b.since).reason if rolled else None
    check = state.last_check
    held = state.reboot_held
    if held is not None and (state.pending is None or state.pending.version != held.version):
        held = None  # about an update that is no longer pending: rebooted, or replaced
    config = ctx.config
    sealed = encryption.state_encryption(ctx.machine.state_report, ctx.machine.tpm_class)
    return Status(
        image=booted.image,
        arch=ctx.machine.arch,
        booted_version=str(booted.version),
        slots=tuple(slot_list),
        channel=config.channel,
        url=config.url,
        strategy=config.strategy,
        interval=config.interval,
        seed=seed,
        last_check=None if check is None else check.time.isoformat(timespec="seconds"),
        last_result=None if check is None else check.result,
        pending=None if state.pending is None else str(state.pending.version),
        pending_changes=() if state.pending is None else state.pending.changes,
        etc_drift=etcdrift.drift(
            ctx.machine.state_dir, ctx.machine.etc_list, ctx.machine.etc_upper, booted.version
        ),
        bad=tuple(f"{b.version}: {b.reason}" for b in state.bad),
        transfers=tuple(t.describe() for t in state.transfers),
        secure_boot=str(firmware.secure_boot(ctx.machine.efivars)),
        lockdown=firmware.lockdown(ctx.machine.lockdown),
        state_encryption=sealed.describe(),
        state_encrypted=sealed.encrypted,
        state_binding=sealed.binding,
        tpm=sealed.tpm,
        rollback_note=note,
        boot_entries=tuple(e.name for e in bootentries.list_entries(ctx.machine.esp)),
        busy=None if holder is None else holder.describe(),
        reboot_held=None
        if held is None
        else f"{held.version}: {held.reason} (since {held.since.isoformat(timespec='seconds')}; "
        f"retrying at {held.retry.isoformat(timespec='seconds')})",
    )


def pending(ctx: Context) -> Version | None:
    """The installed version waiting for a reboot, as the state file says; reads only."""
    record = ctx.read_state().pending
    return None if record is None else record.version
