"""Installing a release into the inactive slot, and checking it again before its reboot.

`apply` works in this order, and the order is the safety argument:

 1. TUF refresh and selection. Bad signatures, expired or rolled-back metadata, mixed repository
    states, no candidate, a downgrade without `allow_downgrade`, another image or architecture:
    all refused here, before anything local is touched.
    When that release is already installed and pending (the state's record, its slot and its
    ESP entry agree; another actor's apply, say), apply ends here: nothing is written again.
 2. Signed length and hash of every release file (root.erofs, root.verity, uki.efi and the
    release's manifest.json), then manifest.json itself (tiny: fetched through the same checked
    stream into a temporary file) which must agree with the channel entry (image, arch, version,
    roothash) and with the TUF targets (sizes and hashes). Each payload URL is then probed with a
    HEAD request, so that an unreachable mirror (404, 500, reset) or a file whose declared length
    differs from the signed length is refused while the disk is still untouched.
 3. Space: each payload file must fit its partition of the inactive slot, and the UKI the ESP.
 4. Sanity: the slot to overwrite must not be the booted one (its root hash is on the running
    kernel's command line).
4b. With Secure Boot enforced (the firmware says so), uki.efi is fetched into the state directory
    and its signature checked against the machine's db and dbx, as the firmware will check it: a
    UKI it would refuse is refused here, before the slot or the ESP changes; step 10 then copies
    the checked file instead of fetching it.
 5. `prepare_slot`: random UUIDs and `_writing` labels, before the first payload byte. From here
    on no UKI can boot that slot, old or new.
 6. root.verity, then root.erofs, are streamed straight into the slot's partitions while
    hashing (resumable with HTTP Range; progress in <var>/lib/berth/download-<name>.json). Each
    block of root.erofs is also hashed as dm-verity does, with the salt of root.verity's
    superblock. When the release has block indexes, each file is instead put together from the
    blocks the booted slot (and UKI) already has and range requests for the rest (seeded.py);
    root.verity is then checked against its signed sha256 as a whole, before root.erofs uses it
    as its index.
 7. The hash tree built from those block hashes must have the release's root hash and equal the
    tree written in step 6 (disk/verity.py): the whole slot verified without reading it back.
 8. `commit_slot`: UUIDs from the root hash, version labels (both table copies fsynced).
 9. The ESP entry of the version that used to live in that slot goes: its root is gone.
10. uki.efi is streamed into a hidden temporary file on the ESP, fsynced, and renamed to
    `berth_<version>+3.efi`. That rename is the last step: until it happens the boot loader sees
    nothing new, so a failure anywhere before leaves the machine booting what it booted.
11. The state records the pending version; /run/reboot-required tells kured (and the daemon's
    strategy) that a reboot would start it.

So a refusal in steps 1-4 leaves the disk, the ESP and the boot order byte-identical; a failure in
steps 5-7 leaves the booted slot, its partition entries, the ESP and the boot order untouched and
the inactive slot labelled `_writing` (scratch that nothing boots); docs/updates.md says the same
for operators ("What a failed update leaves behind").

One exception to "the ESP is untouched until step 9": when the inactive slot holds a version whose
entry would boot before the running one (an update installed but not yet booted, being replaced
by a newer one), that entry is removed before step 5. Otherwise a failed download would leave the
boot loader's first choice pointing at a root that no longer exists.

The state file is read once, at the start, and the value passed along; it is written when a
durable record is needed, and only then:

- Before step 5: the record of the choice (the seed, "<version> selected for install") and, when
  the pending record names the slot about to become scratch, the state without it. That write
  must be on disk before `prepare_slot`: after a crash in steps 5-10 no record may say that the
  slot holds an update waiting for its reboot (the daemon would announce it again, and its check
  before that reboot would mark the version bad for bytes that were never its own), and the
  agent's last word is what it was doing.
- Step 11: the pending record and "<version> installed", after the rename of step 10, so that
  the record never names an update the boot loader cannot see.
- A refusal writes its record once, instead: in step 1 (a failed refresh, nothing to install)
  choose.select saves it; in steps 2-4 apply saves the record of its choice.

The ESP is listed once, in step 3; the entries removed before step 5 and in step 9 come from that
listing, which only those removals changed. `staged_uki` looks once more in step 10, its own
guard against replacing an entry of the new version.

Runs on the device's Python with the standard library, python3-requests and python3-tuf.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Protocol

import requests

from updater.disk import authenticode, bootentries, firmware, slots, verity
from updater.errors import (
    DownloadError,
    LengthMismatchError,
    RefusedError,
    ReleaseMismatchError,
    SlotError,
    StorageError,
    VerificationError,
)
from updater.files import write_file_atomic
from updater.release.blockindex import BlockIndexError, check_index, index_name
from updater.release.channel import INDEX_TARGETS, RELEASE_TARGETS, Release
from updater.release.manifest import Manifest, ManifestError
from updater.release.packages import change_lines
from updater.release.version import Version
from updater.update import choose, etcdrift, fetch, seeded
from updater.update.context import Booted, Context
from updater.update.machine import write_reboot_required
from updater.update.state import LastCheck, Pending, State, TransferRecord
from updater.update.trust import TargetInfo, TrustedRepository

log = logging.getLogger(__name__)

MiB = 1 << 20
# The release manifest is a few hundred bytes; a signed length far beyond that is a broken release.
_MANIFEST_LIMIT = MiB
# A block index is 1/128 of its file: 2 MiB for a UKI of 256 MiB, far more than any is.
_INDEX_LIMIT = 2 * MiB
_DATA, _VERITY, _UKI, _MANIFEST = slots.DATA_FILE, slots.VERITY_FILE, "uki.efi", "manifest.json"


class ProgressCallback(Protocol):
    """Called as each payload file comes in: bytes done of total, and how many of them were
    copied from this machine's own disk (a seeded write) rather than fetched."""

    def __call__(self, name: str, done: int, total: int, reused: int = 0) -> None: ...


@dataclass(frozen=True)
class Applied:
    version: Version
    slot: str
    roothash: str
    entry: Path
    already: bool = False  # installed and pending before this apply: nothing was written
    transfer: TransferRecord | None = None  # what the install fetched and reused


def _bind(progress: ProgressCallback | None, name: str, total: int) -> Callable[[int], None] | None:
    if progress is None:
        return None
    report = progress

    def call(done: int) -> None:
        report(name, done, total)

    return call


def _stream(
    ctx: Context,
    name: str,
    info: TargetInfo,
    dest: BinaryIO,
    offset: int,
    *,
    session: requests.Session | None = None,
    progress: ProgressCallback | None = None,
    into_slot: bool = False,
    blocks: verity.BlockHashes | None = None,
) -> None:
    """One release file, checked against its signed length and hash on the way: into a slot
    partition (`into_slot`: resumable, O_DIRECT) or into a new file (the manifest, the UKI's
    temporary file on the ESP: small, nothing to resume)."""
    fetch.stream_to(
        info.url,
        dest,
        offset,
        info.length,
        info.sha256,
        options=ctx.fetch_options,
        session=session,
        state_path=ctx.machine.state_dir / f"download-{name}.json" if into_slot else None,
        progress=_bind(progress, name, info.length),
        direct=into_slot,
        blocks=blocks,
        # root.erofs: its verity tree, checked in step 7, proves every block; a second pass for
        # the whole file's sha256 would add time and no protection (docs/updates.md)
        check_sha256=blocks is None,
    )


def _fetch_small(
    ctx: Context, name: str, info: TargetInfo, release: Release, what: str, limit: int
) -> bytes:
    """A small signed target (the manifest, a block index), checked on the way like the
    payload, through a temporary file."""
    if info.length > limit:
        raise ReleaseMismatchError(
            f"refused {release.label}: its signed {name} is {info.length} bytes, "
            f"more than {what} can be ({limit})"
        )
    with tempfile.TemporaryFile() as f:
        _stream(ctx, name, info, f, 0)
        f.seek(0)
        return f.read()


def _fetch_manifest(ctx: Context, info: TargetInfo, release: Release) -> Manifest:
    data = _fetch_small(ctx, _MANIFEST, info, release, "a release manifest", _MANIFEST_LIMIT)
    text = data.decode("utf-8", errors="replace")
    try:
        return Manifest.from_json(text, f"{release.label} manifest.json")
    except ManifestError as e:
        raise ReleaseMismatchError(f"refused {release.label}: {e}") from None


def _check_release(
    ctx: Context,
    release: Release,
    manifest: Manifest,
    infos: dict[str, TargetInfo],
    booted: Booted,
) -> None:
    what = f"refused {release.label}"
    for field_name, have, want in (
        ("image", manifest.image, booted.image),
        ("architecture", manifest.arch, ctx.machine.arch),
    ):
        if have != want:
            raise ReleaseMismatchError(
                f"{what}: its manifest.json is for {field_name} {have!r}, this machine runs "
                f"{want!r}"
            )
    for field_name, got, channel_says in (
        ("image", manifest.image, release.image),
        ("architecture", manifest.arch, release.arch),
        ("version", str(manifest.version), str(release.version)),
        ("root hash", manifest.roothash, release.roothash),
    ):
        if got != channel_says:
            raise ReleaseMismatchError(
                f"{what}: its manifest.json says {field_name} {got}, the channel says "
                f"{channel_says}"
            )
    for name in (_DATA, _VERITY, _UKI):
        entry = manifest.files.get(name)
        info = infos[name]
        if entry is None:
            raise ReleaseMismatchError(f"{what}: its manifest.json does not list {name}")
        if (entry.size, entry.sha256) != (info.length, info.sha256):
            raise ReleaseMismatchError(
                f"{what}: {name} is {info.length} bytes with sha256 {info.sha256} in the "
                f"signed targets, but {entry.size} bytes with sha256 {entry.sha256} in its "
                "manifest.json"
            )


def _probe(ctx: Context, session: requests.Session, name: str, info: TargetInfo) -> None:
    """Refuse a payload URL that is unreachable or declares another length, before writing."""
    url = info.url
    try:
        response = session.head(
            url,
            timeout=ctx.fetch_options.timeout,
            allow_redirects=True,
            headers={"Accept-Encoding": "identity"},
        )
    except requests.RequestException as e:
        raise DownloadError(
            f"refused {url}: cannot reach {name} before writing anything: {e}", url=url
        ) from e
    with response:
        if response.status_code != 200:
            raise DownloadError(
                f"refused {url}: {name} answers HTTP {response.status_code} "
                f"{response.reason or ''}".rstrip(),
                url=url,
                status=response.status_code,
            )
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.strip() != str(info.length):
            raise LengthMismatchError(
                f"refused {url}: the server declares {name} as {declared.strip()} bytes, the "
                f"signed metadata says {info.length} (target length differs)"
            )


def _check_esp_space(esp: Path, uki: TargetInfo, freed: int) -> None:
    try:
        free = shutil.disk_usage(esp).free
    except OSError as e:
        raise StorageError(f"cannot measure free space on the ESP: {e}") from e
    if uki.length > free + freed:
        raise SlotError(
            f"refused: uki.efi is {uki.length} bytes but the ESP {esp} has "
            f"{free + freed} bytes free"
        )


@dataclass(frozen=True)
class _Plan:
    """What steps 2-4 established: the signed files, the slot to write, the version it holds
    (None when it holds none), and the ESP's entries as listed in step 3 (less any removed
    before step 5)."""

    infos: dict[str, TargetInfo]
    target: slots.Slot
    old: Version | None
    entries: list[bootentries.Entry]
    booted: slots.Slot  # the slot the machine runs from: the seed of the new root
    indexes: dict[str, bytes]  # payload file -> its signed block index (when the release has one)


def _plan(
    ctx: Context,
    repo: TrustedRepository,
    release: Release,
    booted: Booted,
    session: requests.Session,
) -> _Plan:
    """Steps 2-4, and the one ESP change allowed before step 5."""
    esp = ctx.machine.esp
    # (2) signed target info, the release manifest, reachability of the payload
    infos = {name: repo.target_info(release.targets[name]) for name in RELEASE_TARGETS}
    manifest = _fetch_manifest(ctx, infos[_MANIFEST], release)
    _check_release(ctx, release, manifest, infos, booted)
    indexes = _fetch_indexes(ctx, repo, release, infos)
    for name in (_DATA, _VERITY, _UKI):
        _probe(ctx, session, name, infos[name])
    pair = ctx.slot_pair()
    current = slots.booted_slot(pair, booted.roothash)
    target = slots.inactive_slot(pair, booted.roothash)
    # (3) space
    slots.check_space(target, {_DATA: infos[_DATA].length, _VERITY: infos[_VERITY].length})
    entries = bootentries.list_entries(esp)
    old = target.version if target.state is slots.SlotState.INSTALLED else None
    leaving = [e for e in entries if e.version in {old, release.version}]
    _check_esp_space(esp, infos[_UKI], sum(e.path.stat().st_size for e in leaving))
    # (4) sanity: never the running root
    if target.roothash == booted.roothash or target.name == current.name:
        raise SlotError(
            f"refused to install {release.version}: slot {target.name} is the booted one"
        )
    # An entry that boots before the running one must not outlive its root (see the module
    # docstring); it is the only ESP change before the slot is written.
    if old is not None and entries and entries[0].version == old:
        bootentries.remove(esp, [e for e in entries if e.version == old])
        entries = [e for e in entries if e.version != old]
    return _Plan(infos, target, old, entries, current, indexes)


def _fetch_indexes(
    ctx: Context, repo: TrustedRepository, release: Release, infos: dict[str, TargetInfo]
) -> dict[str, bytes]:
    """The signed block indexes the release names, each checked against its file's length (and
    its signed target info added to `infos`)."""
    indexes: dict[str, bytes] = {}
    for index in INDEX_TARGETS:
        if index not in release.targets:
            continue  # published before indexes existed: that file is fetched whole
        name = index.removesuffix(index_name(""))
        info = infos[index] = repo.target_info(release.targets[index])
        data = _fetch_small(ctx, index, info, release, "a block index", _INDEX_LIMIT)
        try:
            check_index(data, infos[name].length, f"{release.label} {index}")
        except BlockIndexError as e:
            raise ReleaseMismatchError(f"refused {e}") from None
        indexes[name] = data
    return indexes


def _seed_state(ctx: Context, name: str) -> Path:
    return ctx.machine.state_dir / f"seed-{name}.json"


def _resuming(path: Path, info: TargetInfo) -> bool:
    """Whether an interrupted seeded write of this very file left blocks worth keeping (each is
    hashed again before it is kept: the record only saves reading the file for nothing)."""
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("sha256") == info.sha256


def _seeded(
    ctx: Context,
    name: str,
    info: TargetInfo,
    wanted: seeded.Wanted,
    dest: BinaryIO,
    offset: int,
    seeds: list[seeded.Seed],
    session: requests.Session,
    progress: ProgressCallback | None,
) -> seeded.Transfer | None:
    """Write `name` from `seeds` and range requests; None when ranges cannot complete it (the
    caller streams it whole over what was written). The record of a seeded write in progress is
    on disk before its first block, so that an apply interrupted by a power cut resumes from the
    blocks already in place."""
    record = _seed_state(ctx, name)
    in_place = _resuming(record, info)
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(record, json.dumps({"sha256": info.sha256, "url": info.url}).encode())
    except OSError as e:
        raise StorageError(f"cannot record the seeded write of {name} in {record}: {e}") from e

    def report(done: int, reused: int) -> None:
        if progress is not None:
            progress(name, done, info.length, reused)

    dest.flush()
    try:
        transfer = seeded.write(
            wanted,
            dest.fileno(),
            offset,
            seeds,
            session=session,
            options=ctx.fetch_options,
            in_place=in_place,
            report=report,
        )
    except seeded.Unseedable as e:
        log.warning("%s; fetching %s whole", e, name)
        record.unlink(missing_ok=True)
        return None
    record.unlink(missing_ok=True)
    log.info(
        "%s: %d bytes reused, %d fetched in %d requests",
        name,
        transfer.reused,
        transfer.fetched,
        transfer.requests,
    )
    return transfer


@dataclass(frozen=True)
class _BootedTree:
    """The booted slot's hash tree, read from its partition."""

    file: BinaryIO
    offset: int
    superblock: verity.Superblock
    where: str


def _booted_tree(
    ctx: Context, booted: slots.Slot, stack: contextlib.ExitStack
) -> _BootedTree | None:
    """The booted slot's tree partition, open for the seeds; None when it cannot be read (the
    update is then fetched whole: a seed is an optimisation, never a condition)."""
    where = f"the booted slot {booted.name}"
    try:
        tree, offset = stack.enter_context(
            slots.open_partition(ctx.machine.disk, booted.verity_number, booted.verity, mode="rb")
        )
        superblock = verity.read_superblock(tree.fileno(), offset, where)
    except (OSError, VerificationError) as e:
        log.warning("%s cannot seed the update (%s): fetching it whole", where, e)
        return None
    return _BootedTree(tree, offset, superblock, where)


def _tree_seed(booted: _BootedTree | None) -> seeded.Seed | None:
    """The booted root.verity as a seed of the new one: a version bump or a changed file leaves
    most of its blocks as they were."""
    if booted is None:
        return None
    size = verity.tree_size(booted.superblock)
    return seeded.Seed(f"{booted.where}'s hash tree", booted.file.fileno(), booted.offset, size)


def _root_seed(
    ctx: Context,
    booted: slots.Slot,
    tree: _BootedTree | None,
    salt: bytes,
    stack: contextlib.ExitStack,
) -> seeded.Seed | None:
    """The booted root, read from its partition (not its dm-verity device: see seeded.py), with
    its own tree's bottom level as the digests when the trees share the salt (every release of
    one image does: builder/verity.py). None when the booted slot cannot be read."""
    if tree is None:
        return None
    superblock, where = tree.superblock, tree.where
    try:
        data, data_offset = stack.enter_context(
            slots.open_partition(ctx.machine.disk, booted.data_number, booted.data, mode="rb")
        )
        reader = None
        if superblock.salt == salt and superblock.data_blocks > 1:
            fd, tree_offset = tree.file.fileno(), tree.offset
            verity.data_digests_at(tree_offset, superblock, where)  # a tree with levels

            def reader(first: int, end: int) -> bytes:
                return verity.read_data_digests(fd, tree_offset, superblock, where, first, end)

    except (OSError, VerificationError) as e:
        log.warning("%s cannot seed the update (%s): fetching the root whole", where, e)
        return None
    return seeded.Seed(where, data.fileno(), data_offset, superblock.data_size, reader)


def _write_indexed(
    ctx: Context,
    plan: _Plan,
    name: str,
    seed: seeded.Seed | None,
    out: BinaryIO,
    offset: int,
    session: requests.Session,
    progress: ProgressCallback | None,
    *,
    into_slot: bool,
) -> seeded.Transfer:
    """A file the release publishes a block index for (root.verity, the UKI) at `offset` of
    `out`: from `seed` and ranges of the rest when the index and the seed are there, else
    streamed whole. Either way its sha256 must be the signed one."""
    info = plan.infos[name]
    index = plan.indexes.get(name)
    if index is not None and seed is not None:
        wanted = seeded.Wanted(name, info.url, info.length, index, seeded.BlockHash(None))
        done = _seeded(ctx, name, info, wanted, out, offset, [seed], session, progress)
        if done is not None:
            _check_sha256(out, offset, info, f"the new {name}")
            return done
    _stream(ctx, name, info, out, offset, session=session, progress=progress, into_slot=into_slot)
    return seeded.Transfer(fetched=info.length, requests=1)


def _write_slot(
    ctx: Context,
    plan: _Plan,
    target: slots.Slot,
    roothash: str,
    session: requests.Session,
    progress: ProgressCallback | None,
) -> seeded.Transfer:
    """Steps 6 and 7: the hash tree, then the root, into the slot, each from the blocks the
    booted slot already has and ranges of the rest, or streamed whole. Either way the tree built
    from the root's block digests must be the signed root hash's and the one just written."""
    disk = ctx.machine.disk
    infos = plan.infos
    where = f"slot {target.name}"
    with (
        contextlib.ExitStack() as stack,
        slots.open_partition(disk, target.verity_number, target.verity) as (tree, tree_offset),
    ):
        booted = _booted_tree(ctx, plan.booted, stack)
        seed = _tree_seed(booted)
        transfer = _write_indexed(
            ctx, plan, _VERITY, seed, tree, tree_offset, session, progress, into_slot=True
        )
        superblock = verity.read_superblock(tree.fileno(), tree_offset, where)
        superblock.check(infos[_DATA].length, f"{where} ({_VERITY})")
        seed = _root_seed(ctx, plan.booted, booted, superblock.salt, stack)
        with slots.open_partition(disk, target.data_number, target.data) as (data, data_offset):
            done = None
            if seed is not None and superblock.data_blocks > 1:
                # The new tree's bottom level, signed through root.verity's sha256: the digest
                # every block of the new root must have, wherever it comes from.
                wanted = seeded.Wanted(
                    _DATA,
                    infos[_DATA].url,
                    infos[_DATA].length,
                    verity.read_data_digests(tree.fileno(), tree_offset, superblock, where),
                    seeded.BlockHash(superblock.salt),
                )
                done = _seeded(
                    ctx, _DATA, infos[_DATA], wanted, data, data_offset, [seed], session, progress
                )
            if done is not None:
                digests: verity.Digests = wanted.digests
                transfer.add(done)
            else:
                blocks = verity.BlockHashes(superblock.salt)
                _stream(
                    ctx,
                    _DATA,
                    infos[_DATA],
                    data,
                    data_offset,
                    session=session,
                    progress=progress,
                    into_slot=True,
                    blocks=blocks,
                )
                digests = blocks.finish(f"{where} ({_DATA})")
                transfer.add(seeded.Transfer(fetched=infos[_DATA].length, requests=1))
        verity.check_tree(tree.fileno(), tree_offset, superblock, digests, roothash, where)
    return transfer


def _write_uki(
    ctx: Context,
    plan: _Plan,
    booted: Booted,
    out: BinaryIO,
    session: requests.Session,
    progress: ProgressCallback | None,
) -> seeded.Transfer:
    """Step 10's bytes: from the booted UKI and ranges of the rest when the release has the
    UKI's block index, else streamed whole; then its sha256 must be the signed one."""
    info = plan.infos[_UKI]
    current = [e for e in plan.entries if e.version == booted.version]
    with contextlib.ExitStack() as stack:
        seed = None
        if current and _UKI in plan.indexes:
            try:
                source = stack.enter_context(current[0].path.open("rb"))
                size = os.fstat(source.fileno()).st_size
            except OSError as e:
                log.warning("the booted UKI cannot seed the update (%s)", e)
            else:
                seed = seeded.Seed(f"the booted UKI {current[0].name}", source.fileno(), 0, size)
                out.truncate(info.length)
        return _write_indexed(ctx, plan, _UKI, seed, out, 0, session, progress, into_slot=False)


@dataclass(frozen=True)
class _CheckedUKI:
    path: Path  # in the agent's state directory, removed once copied to the ESP
    transfer: seeded.Transfer


def _firmware_check(
    ctx: Context,
    plan: _Plan,
    release: Release,
    booted: Booted,
    session: requests.Session,
    progress: ProgressCallback | None,
) -> _CheckedUKI | None:
    """With Secure Boot enforced: the new UKI, fetched (or seeded) into the state directory and
    checked as the firmware will check it, against the machine's db and dbx; refused, with the
    certificate it was signed with, before anything is written to the slot or the ESP. None when
    Secure Boot is not enforced: the UKI then goes straight to the ESP in step 10."""
    state = firmware.secure_boot(ctx.machine.efivars)
    if state is not firmware.SecureBoot.ENABLED:
        return None
    path = ctx.machine.state_dir / "uki.checked.tmp"
    try:
        ctx.machine.state_dir.mkdir(parents=True, exist_ok=True)
        with path.open("w+b") as out:
            done = _write_uki(ctx, plan, booted, out, session, progress)
            out.seek(0)
            with mmap.mmap(out.fileno(), 0, access=mmap.ACCESS_READ) as image:
                db = authenticode.read_database(ctx.machine.efivars, "db")
                dbx = authenticode.read_database(ctx.machine.efivars, "dbx")
                signature = authenticode.check_image(
                    image, db, dbx, f"the UKI of {release.version}"
                )
    except OSError as e:
        path.unlink(missing_ok=True)
        raise StorageError(f"cannot stage the new UKI in {path}: {e}") from e
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    log.info(
        "the UKI of %s is signed by %s, which this machine's db trusts",
        release.version,
        signature.describe(),
    )
    return _CheckedUKI(path, done)


def _copy_checked(checked: _CheckedUKI, out: BinaryIO) -> seeded.Transfer:
    """Step 10's bytes from the UKI `_firmware_check` accepted (no network: it was fetched)."""
    try:
        with checked.path.open("rb") as source:
            shutil.copyfileobj(source, out, 1 << 20)
    except OSError as e:
        raise StorageError(f"cannot copy the checked UKI from {checked.path}: {e}") from e
    checked.path.unlink(missing_ok=True)
    return checked.transfer


def _check_sha256(f: BinaryIO, offset: int, info: TargetInfo, what: str) -> None:
    """The file at `offset` of `f`, read back, against its signed sha256: every block matched
    the signed index already; this is the file's own signature, and cheap for a UKI or a tree
    (1/128 of its root)."""
    digest = hashlib.sha256()
    position = 0
    try:
        while position < info.length:
            data = os.pread(f.fileno(), min(MiB, info.length - position), offset + position)
            if not data:
                break
            digest.update(data)
            position += len(data)
    except OSError as e:
        raise StorageError(f"reading back {what} failed: {e}") from e
    if position != info.length or digest.hexdigest() != info.sha256:
        raise VerificationError(
            f"refused {info.url}: {what} hashes to sha256 {digest.hexdigest()} ({position} "
            f"bytes), the trusted metadata says {info.sha256} ({info.length} bytes)"
        )


def apply(
    ctx: Context,
    version: Version | None = None,
    *,
    allow_downgrade: bool = False,
    ignore_waves: bool = False,
    progress: ProgressCallback | None = None,
) -> Applied:
    """Install the selected (or the given) release into the inactive slot; see the module
    docstring for the order of steps and for when the state file is written. Raises an
    UpdateError subclass on any refusal."""
    booted = ctx.booted()
    repo = choose.repository(ctx)
    machine = ctx.machine
    esp = machine.esp
    state = ctx.load_state()  # the one read: from here on the value is passed along

    # (1) refresh and select; a refusal here saves its own record
    release, state = choose.select(
        ctx,
        repo,
        booted,
        state,
        version,
        allow_downgrade=allow_downgrade,
        ignore_waves=ignore_waves,
    )
    ctx.step(f"checking {release.version}'s release files", action=f"applying {release.version}")
    done = _pending_already(ctx, state, release)
    if done is not None:
        # Another actor's apply (or an earlier one) installed it: writing it again would only
        # turn a slot that waits for its reboot into scratch for the length of a download.
        ctx.save_state(
            replace(
                state,
                last_check=LastCheck(
                    ctx.now(), f"{release.version} already installed, pending reboot", True
                ),
            )
        )
        write_reboot_required(machine)
        return done
    with requests.Session() as session:
        session.headers["User-Agent"] = "berth-update"
        try:
            plan = _plan(ctx, repo, release, booted, session)  # (2)-(4)
            # (4b) with Secure Boot enforced, the UKI first, into /var: one the firmware would
            # refuse must not cost the other slot's contents or an entry (see _firmware_check).
            checked = _firmware_check(ctx, plan, release, booted, session, progress)
        except BaseException:
            ctx.save_state(state)  # refused before the slot is touched: the choice's record
            raise
        target = plan.target
        if state.pending is not None and state.pending.slot == str(target.name):
            state = replace(state, pending=None)
        ctx.save_state(state)  # durable before (5): see the module docstring
        # (5) the slot becomes scratch
        ctx.step(f"writing slot {target.name}")
        with machine.disk.open("r+b") as disk:
            target = slots.prepare_slot(disk, target, booted=booted.roothash)
        # (6) stream the hash tree, then the root, into the slot; (7) check the tree
        transfer = _write_slot(ctx, plan, target, release.roothash, session, progress)
        # (8) name the slot (gpt writes and fsyncs both table copies)
        ctx.step(f"installing {release.version} into slot {target.name} and the ESP")
        with machine.disk.open("r+b") as disk:
            target = slots.commit_slot(disk, target, release.version, release.roothash)
        # (9) entries whose root is gone, or that would clash with the new one: from the listing
        # of step 3, which only this apply changed since
        stale = {plan.old, release.version}
        bootentries.remove(esp, [e for e in plan.entries if e.version in stale])
        # The booted release's /etc list, for the new release's boots to tell which of the
        # machine's /etc files hide a change it makes (update/etcdrift.py)
        etcdrift.keep_booted_list(machine.etc_list, machine.state_dir, booted.version)
        # (10) the UKI: temporary name, fsync, rename with a boot counter (the last step)
        with bootentries.staged_uki(esp, release.version) as out:
            if checked is None:
                transfer.add(_write_uki(ctx, plan, booted, out, session, progress))
            else:
                transfer.add(_copy_checked(checked, out))
    entry = bootentries.entry_dir(esp) / bootentries.entry_name(
        release.version, bootentries.DEFAULT_TRIES
    )
    # (11) remember, and tell whoever reboots
    if version is not None:
        state = state.without_bad(release.version)  # an explicit request lifts the mark
    state = replace(
        state,
        pending=Pending(
            release.version,
            str(target.name),
            release.roothash,
            ctx.now(),
            ctx.boot_id(),
            change_lines(release.changes),
        ),
        last_check=LastCheck(ctx.now(), f"{release.version} installed", True),
    )
    # The manifest and the block indexes came whole too.
    small = [plan.infos[name] for name in (_MANIFEST, *INDEX_TARGETS) if name in plan.infos]
    record = TransferRecord(
        release.version,
        transfer.fetched + sum(info.length for info in small),
        transfer.reused,
        transfer.requests + len(small),
        ctx.now().replace(microsecond=0),  # as the state file keeps it
    )
    state = state.with_transfer(record)
    ctx.save_state(state)
    write_reboot_required(machine)
    log.info(
        "installed %s into slot %s; a reboot starts it (%s)",
        release.version,
        target.name,
        record.describe().split(": ", 1)[1],
    )
    return Applied(release.version, str(target.name), release.roothash, entry, transfer=record)


def _pending_already(ctx: Context, state: State, release: Release) -> Applied | None:
    """`release` as installed, when the state says it is pending and the slot it names and the
    ESP still hold it; else None (it is written again)."""
    pending = state.pending
    if pending is None or (pending.version, pending.roothash) != (
        release.version,
        release.roothash,
    ):
        return None
    slot = next((s for s in ctx.slot_pair() if str(s.name) == pending.slot), None)
    if (
        slot is None
        or slot.state is not slots.SlotState.INSTALLED
        or (slot.version, slot.roothash) != (release.version, release.roothash)
    ):
        return None
    entries = [e for e in bootentries.list_entries(ctx.machine.esp) if e.version == release.version]
    if not entries:
        return None
    return Applied(release.version, pending.slot, release.roothash, entries[0].path, already=True)


def verify_pending(ctx: Context) -> Version:
    """Re-verify the pending slot against its signed root hash before rebooting into it.

    Bytes that changed after the install (a failing disk, a tampering process) must not get as
    far as the boot loader. On a mismatch the version's boot entries are removed and it is
    marked bad, and the VerificationError says why; the running system is untouched.
    """
    state = ctx.load_state()
    pending = state.pending
    if pending is None:
        raise RefusedError("nothing is pending: there is no installed update to verify")
    slot = next((s for s in ctx.slot_pair() if str(s.name) == pending.slot), None)
    if slot is None:
        raise SlotError(f"the pending {pending.version} names slot {pending.slot}, which is gone")
    try:
        with ctx.machine.disk.open("rb") as disk:
            size = slots.verity_data_size(disk, slot)
        slots.verify_slot(ctx.machine.disk, slot, pending.roothash, size)
    except VerificationError as e:
        bootentries.remove_entries(ctx.machine.esp, pending.version)
        reason = (
            f"refused to boot {pending.version}: slot {slot.name} changed after it was "
            f"installed ({e})"
        )
        state = replace(state.with_bad(pending.version, reason, ctx.now()), pending=None)
        ctx.save_state(state)
        raise VerificationError(reason) from e
    return pending.version
