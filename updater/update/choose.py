"""Choosing a release: refresh the signed metadata, read this machine's channel, and pick what it
should run, by its place in the rollout waves (the seed) or by the operator's explicit version.

Every refusal happens here before anything local is touched (bad signatures, expired or
rolled-back metadata, no candidate, a downgrade without consent, another image or architecture);
what a check found is recorded in the state file for `berth-update status`.

These functions take the agent's state and return it changed; the caller saves it once. Only a
check that ends here (a failed refresh, nothing to install) saves its own record before raising.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

from updater.errors import RefusedError, UpdateError
from updater.release.channel import (
    ChannelManifest,
    Release,
    Selection,
    changes_for,
    machine_seed,
    select_candidate,
    select_version,
)
from updater.release.version import Version
from updater.update.context import Booted, Context
from updater.update.state import LastCheck, State
from updater.update.trust import TrustedRepository

log = logging.getLogger(__name__)


def seed(ctx: Context, state: State) -> tuple[int, State]:
    """This machine's place in the waves (0-2047), and the state that remembers it.

    From /etc/machine-id; without one, the seed the state remembers, or else a random one (which
    the next check or apply saves, so that the machine keeps that place).
    """
    machine_id = ctx.machine.machine_id
    try:
        value = machine_seed(machine_id.read_text(encoding="ascii"))
    except (OSError, ValueError) as e:
        if state.seed is not None:
            return state.seed, state
        # Without a machine id the machine still needs a stable place in the waves.
        value = int.from_bytes(os.urandom(2), "big") % 2048
        log.warning("%s unusable (%s); using the random seed %d", machine_id, e, value)
    if state.seed != value:
        state = replace(state, seed=value)
    return value, state


def repository(ctx: Context) -> TrustedRepository:
    """The TUF client of the configured repository; RefusedError when none is configured."""
    if not ctx.config.url:
        raise RefusedError(
            "no update repository is configured: set url in the [update] table of "
            "/etc/berth/update.toml"
        )
    return TrustedRepository(
        ctx.machine.state_dir / "tuf",
        ctx.machine.trusted_root,
        ctx.config.metadata_url,
        ctx.config.targets_url,
    )


def record(ctx: Context, state: State, result: str, ok: bool) -> State:
    """`state` with what this check found; the caller saves it."""
    return replace(state, last_check=LastCheck(ctx.now(), result, ok))


def channel(ctx: Context, repo: TrustedRepository, state: State) -> ChannelManifest:
    """Refresh the signed metadata, then this machine's channel. A failure ends the check: its
    record (with `state`) is saved here, and the error raised."""
    try:
        repo.refresh()
        return repo.channel(ctx.config.channel)
    except UpdateError as e:
        ctx.save_state(record(ctx, state, f"failed: {e}", ok=False))
        raise


def candidate(
    ctx: Context, repo: TrustedRepository, booted: Booted, state: State, *, ignore_waves: bool
) -> tuple[ChannelManifest, Selection, State]:
    """Refresh, then the newest release this machine may take now (the daemon's choice), and
    `state` with this machine's seed."""
    value, state = seed(ctx, state)
    manifest = channel(ctx, repo, state)
    selection = select_candidate(
        manifest,
        image=booted.image,
        arch=ctx.machine.arch,
        booted=booted.version,
        seed=value,
        now=ctx.now(),
        bad=state.bad_versions,
        ignore_waves=ignore_waves,
    )
    if selection.release is not None:
        selection = replace(selection, release=as_seen(manifest, selection.release, booted))
    return manifest, selection, state


def as_seen(manifest: ChannelManifest, release: Release, booted: Booted) -> Release:
    """`release` with the package changes it makes on this machine: from the booted version,
    chained through the releases in between; where the chain is broken (the booted version was
    never on this channel), the release's own list, whose `since` says what it is from."""
    composed = changes_for(manifest, release, booted.version)
    return release if composed is None else replace(release, changes=composed)


def check(ctx: Context, *, ignore_waves: bool = False) -> Selection:
    """Refresh the signed metadata and pick the release this machine should install now; the
    state file is read once and written once, with what the check found."""
    booted = ctx.booted()
    repo = repository(ctx)
    _, selection, state = candidate(ctx, repo, booted, ctx.load_state(), ignore_waves=ignore_waves)
    if selection.release is not None:
        state = record(ctx, state, f"{selection.release.version} available", ok=True)
    else:
        state = record(ctx, state, f"up to date ({booted.version})", ok=True)
    ctx.save_state(state)
    return selection


def select(
    ctx: Context,
    repo: TrustedRepository,
    booted: Booted,
    state: State,
    version: Version | None,
    *,
    allow_downgrade: bool,
    ignore_waves: bool,
) -> tuple[Release, State]:
    """The release apply installs: the candidate, or `version` when the operator names one; and
    `state` with the record of that choice, for apply to save with its first durable record.

    A refusal for want of a candidate (or a failed refresh) saves its record and raises.
    """
    if version is None:
        manifest, selection, state = candidate(ctx, repo, booted, state, ignore_waves=ignore_waves)
        where = f"{booted.image} ({ctx.machine.arch}) in channel {manifest.channel}"
        if selection.release is None:
            ctx.save_state(record(ctx, state, f"up to date ({booted.version})", ok=True))
            skipped = "; ".join(selection.reasons)
            raise RefusedError(
                f"refused to apply: no release newer than the booted {booted.version} to "
                f"install for {where}" + (f" (skipped {skipped})" if skipped else "")
            )
        release = selection.release  # as candidate() saw it: with this machine's changes
    else:
        manifest = channel(ctx, repo, state)
        selection = select_version(
            manifest,
            version,
            image=booted.image,
            arch=ctx.machine.arch,
            booted=booted.version,
            allow_downgrade=allow_downgrade,
        )
        if selection.release is None:
            reason = "; ".join(s.reason for s in selection.skipped)
            raise RefusedError(f"refused to install {version}: {reason}")
        release = as_seen(manifest, selection.release, booted)
    return release, record(ctx, state, f"{release.version} selected for install", ok=True)
