"""Choosing a release: refresh the signed metadata, read this machine's channel, and pick what it
should run, by its place in the rollout waves (the seed) or by the operator's explicit version.

Every refusal happens here before anything local is touched (bad signatures, expired or
rolled-back metadata, no candidate, a downgrade without consent, another image or architecture);
what a check found is recorded in the state file for `berth-update status`.
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

    From /etc/machine-id; without one, the seed the state remembers, or else a random one (the
    caller saves it, so that the machine keeps that place).
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


def record(ctx: Context, result: str, ok: bool) -> None:
    state = ctx.load_state()
    ctx.save_state(replace(state, last_check=LastCheck(ctx.now(), result, ok)))


def channel(ctx: Context, repo: TrustedRepository) -> ChannelManifest:
    """Refresh the signed metadata, then this machine's channel; a failure is recorded."""
    try:
        repo.refresh()
        return repo.channel(ctx.config.channel)
    except UpdateError as e:
        record(ctx, f"failed: {e}", ok=False)
        raise


def candidate(
    ctx: Context, repo: TrustedRepository, booted: Booted, *, ignore_waves: bool
) -> tuple[ChannelManifest, Selection]:
    """Refresh, then the newest release this machine may take now (the daemon's choice)."""
    state = ctx.load_state()
    value, state = seed(ctx, state)
    ctx.save_state(state)
    manifest = channel(ctx, repo)
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
    return manifest, selection


def check(ctx: Context, *, ignore_waves: bool = False) -> Selection:
    """Refresh the signed metadata and pick the release this machine should install now."""
    booted = ctx.booted()
    _, selection = candidate(ctx, repository(ctx), booted, ignore_waves=ignore_waves)
    if selection.release is not None:
        record(ctx, f"{selection.release.version} available", ok=True)
    else:
        record(ctx, f"up to date ({booted.version})", ok=True)
    return selection


def select(
    ctx: Context,
    repo: TrustedRepository,
    booted: Booted,
    version: Version | None,
    *,
    allow_downgrade: bool,
    ignore_waves: bool,
) -> Release:
    """The release apply installs: the candidate, or `version` when the operator names one."""
    if version is None:
        manifest, selection = candidate(ctx, repo, booted, ignore_waves=ignore_waves)
        where = f"{booted.image} ({ctx.machine.arch}) in channel {manifest.channel}"
        if selection.release is None:
            record(ctx, f"up to date ({booted.version})", ok=True)
            skipped = "; ".join(selection.reasons)
            raise RefusedError(
                f"refused to apply: no release newer than the booted {booted.version} to "
                f"install for {where}" + (f" (skipped {skipped})" if skipped else "")
            )
    else:
        selection = select_version(
            channel(ctx, repo),
            version,
            image=booted.image,
            arch=ctx.machine.arch,
            booted=booted.version,
            allow_downgrade=allow_downgrade,
        )
        if selection.release is None:
            reason = "; ".join(s.reason for s in selection.skipped)
            raise RefusedError(f"refused to install {version}: {reason}")
    release = selection.release
    record(ctx, f"{release.version} selected for install", ok=True)
    return release
