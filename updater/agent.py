"""The update agent: check the signed channel, install into the inactive slot, judge each boot.

`Agent.apply` works in this order, and the order is the safety argument:

 1. TUF refresh and selection. Bad signatures, expired or rolled-back metadata, mixed repository
    states, no candidate, a downgrade without `allow_downgrade`, another image or architecture:
    all refused here, before anything local is touched.
 2. Signed length and hash of every release file (root.erofs, root.verity, uki.efi and the
    release's manifest.json), then manifest.json itself (tiny: fetched through the same checked
    stream into a temporary file) which must agree with the channel entry (image, arch, version,
    roothash) and with the TUF targets (sizes and hashes). Each payload URL is then probed with a
    HEAD request, so that an unreachable mirror (404, 500, reset) or a file whose declared length
    differs from the signed length is refused while the disk is still untouched.
 3. Space: each payload file must fit its partition of the inactive slot, and the UKI the ESP.
 4. Sanity: the slot to overwrite must not be the booted one (its root hash is on the running
    kernel's command line).
 5. `prepare_slot`: random UUIDs and `_writing` labels, before the first payload byte. From here
    on no UKI can boot that slot, old or new.
 6. root.verity, then root.erofs, are streamed straight into the slot's partitions while
    hashing (resumable with HTTP Range; progress in <var>/lib/berth/download-<name>.json). Each
    block of root.erofs is also hashed as dm-verity does, with the salt of root.verity's
    superblock.
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

Runs on the device's Python with the standard library, python3-requests and python3-tuf.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

import requests

from updater.config import Strategy, UpdateConfig
from updater.disk import bootentries, gpt, slots, verity
from updater.errors import (
    DownloadError,
    LengthMismatchError,
    RefusedError,
    ReleaseMismatchError,
    SlotError,
    StorageError,
    UpdateError,
    VerificationError,
)
from updater.release.channel import (
    RELEASE_TARGETS,
    ChannelManifest,
    Release,
    Selection,
    machine_seed,
    select_candidate,
    select_version,
)
from updater.release.manifest import Manifest, ManifestError
from updater.release.version import Version
from updater.update import fetch
from updater.update.machine import FetchOptions, Machine, write_reboot_required
from updater.update.state import LastCheck, Pending, State, load_state, save_state, state_path
from updater.update.trust import TargetInfo, TrustedRepository

log = logging.getLogger(__name__)

MiB = 1 << 20
# The release manifest is a few hundred bytes; a signed length far beyond that is a broken release.
_MANIFEST_LIMIT = MiB
_DATA, _VERITY, _UKI, _MANIFEST = slots.DATA_FILE, slots.VERITY_FILE, "uki.efi", "manifest.json"

# (file name, bytes done, bytes total); called as each payload file streams in.
ProgressCallback = Callable[[str, int, int], None]


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

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["slots"] = [{**asdict(s), "state": str(s.state)} for s in self.slots]
        doc["strategy"] = str(self.strategy)
        doc["bad"] = list(self.bad)
        doc["boot_entries"] = list(self.boot_entries)
        return doc


@dataclass(frozen=True)
class Applied:
    version: Version
    slot: str
    roothash: str
    entry: Path


@dataclass(frozen=True)
class AfterBoot:
    booted: Version
    rolled_back_from: tuple[Version, ...] = ()
    reasons: tuple[str, ...] = ()
    blessed: Version | None = None  # the pending version that booted fine and is now current
    waiting: bool = False  # the pending version booted but is not blessed yet
    pruned: tuple[str, ...] = ()
    damaged: tuple[str, ...] = ()  # entries systemd-boot could not load: removed, to reinstall


@dataclass(frozen=True)
class RolledBack:
    from_version: Version
    to_version: Version
    renamed: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class _Booted:
    image: str
    version: Version
    roothash: str


def read_os_release(path: Path) -> dict[str, str]:
    """KEY=value pairs of an os-release file, with shell quoting removed."""
    fields: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UpdateError(f"cannot read {path}: {e}") from e
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        try:
            parts = shlex.split(value)
        except ValueError:
            continue
        fields[key] = parts[0] if parts else ""
    return fields


@contextlib.contextmanager
def open_partition(
    disk: Path, number: int, partition: gpt.Partition
) -> Iterator[tuple[BinaryIO, int]]:
    """A partition opened for writing, and the offset its first byte has in that file.

    On a device the kernel's partition node (offset 0): writes cannot stray outside it. On a disk
    image file (tests, images prepared offline) the whole file at the partition's offset.
    """
    if stat.S_ISBLK(disk.stat().st_mode):
        with slots.partition_path(disk, number).open("r+b") as f:
            yield f, 0
    else:
        with disk.open("r+b") as f:
            yield f, partition.offset_bytes()


class Agent:
    def __init__(
        self,
        machine: Machine,
        config: UpdateConfig,
        *,
        now: Callable[[], datetime] | None = None,
        fetch_options: FetchOptions | None = None,
    ) -> None:
        self.machine = machine
        self.config = config
        self._now = now or (lambda: datetime.now(UTC))
        self.fetch_options = fetch_options or FetchOptions()
        self._state_path = state_path(machine.var)

    # -- small readers -------------------------------------------------------------------------

    def _load(self) -> State:
        return load_state(self._state_path, self._now())

    def _save(self, state: State) -> None:
        save_state(self._state_path, state)

    def _booted(self) -> _Booted:
        fields = read_os_release(self.machine.os_release)
        image, text = fields.get("IMAGE_ID"), fields.get("IMAGE_VERSION")
        if not image or not text:
            raise UpdateError(
                f"{self.machine.os_release} has no IMAGE_ID or IMAGE_VERSION: not a Berth image"
            )
        try:
            version = Version.parse(text)
        except ValueError as e:
            raise UpdateError(f"{self.machine.os_release}: IMAGE_VERSION: {e}") from None
        roothash = slots.booted_roothash(self.machine.cmdline)
        return _Booted(image, version, roothash)

    def _seed(self, state: State) -> tuple[int, State]:
        try:
            seed = machine_seed(self.machine.machine_id.read_text(encoding="ascii"))
        except (OSError, ValueError) as e:
            if state.seed is not None:
                return state.seed, state
            # Without a machine id the machine still needs a stable place in the waves.
            seed = int.from_bytes(os.urandom(2), "big") % 2048
            log.warning(
                "%s unusable (%s); using the random seed %d", self.machine.machine_id, e, seed
            )
        if state.seed != seed:
            state = replace(state, seed=seed)
        return seed, state

    def _boot_id(self) -> str:
        try:
            return self.machine.boot_id.read_text(encoding="ascii").strip()
        except OSError:
            return ""

    def _slots(self) -> tuple[slots.Slot, slots.Slot]:
        try:
            with self.machine.disk.open("rb") as disk:
                return slots.read_slots(disk)
        except OSError as e:
            raise SlotError(f"cannot read the slots of {self.machine.disk}: {e}") from e

    def repository(self) -> TrustedRepository:
        if not self.config.url:
            raise RefusedError(
                "no update repository is configured: set url in the [update] table of "
                "/etc/berth/update.toml"
            )
        return TrustedRepository(
            self.machine.state_dir / "tuf",
            self.machine.trusted_root,
            self.config.metadata_url,
            self.config.targets_url,
        )

    # -- status --------------------------------------------------------------------------------

    def status(self) -> Status:
        """What this machine runs, what each slot holds, what the agent last did. No network."""
        state = self._load()
        booted = self._booted()
        seed, seeded = self._seed(state)
        if seeded != state:
            with contextlib.suppress(StorageError):
                self._save(seeded)
        slot_list = []
        for slot in self._slots():
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
        return Status(
            image=booted.image,
            arch=self.machine.arch,
            booted_version=str(booted.version),
            slots=tuple(slot_list),
            channel=self.config.channel,
            url=self.config.url,
            strategy=self.config.strategy,
            interval=self.config.interval,
            seed=seed,
            last_check=None if check is None else check.time.isoformat(timespec="seconds"),
            last_result=None if check is None else check.result,
            pending=None if state.pending is None else str(state.pending.version),
            bad=tuple(f"{b.version}: {b.reason}" for b in state.bad),
            rollback_note=note,
            boot_entries=tuple(e.name for e in bootentries.list_entries(self.machine.esp)),
        )

    # -- check ---------------------------------------------------------------------------------

    def _record(self, result: str, ok: bool) -> None:
        state = self._load()
        self._save(replace(state, last_check=LastCheck(self._now(), result, ok)))

    def _channel(self, repo: TrustedRepository) -> ChannelManifest:
        try:
            repo.refresh()
            return repo.channel(self.config.channel)
        except UpdateError as e:
            self._record(f"failed: {e}", ok=False)
            raise

    def _candidate(
        self, repo: TrustedRepository, booted: _Booted, *, ignore_waves: bool
    ) -> tuple[ChannelManifest, Selection]:
        """Refresh, then the newest release this machine may take now (the daemon's choice)."""
        state = self._load()
        seed, state = self._seed(state)
        self._save(state)
        channel = self._channel(repo)
        selection = select_candidate(
            channel,
            image=booted.image,
            arch=self.machine.arch,
            booted=booted.version,
            seed=seed,
            now=self._now(),
            bad=state.bad_versions,
            ignore_waves=ignore_waves,
        )
        return channel, selection

    def check(self, *, ignore_waves: bool = False) -> Selection:
        """Refresh the signed metadata and pick the release this machine should install now."""
        booted = self._booted()
        _, selection = self._candidate(self.repository(), booted, ignore_waves=ignore_waves)
        if selection.release is not None:
            self._record(f"{selection.release.version} available", ok=True)
        else:
            self._record(f"up to date ({booted.version})", ok=True)
        return selection

    # -- apply ---------------------------------------------------------------------------------

    def _select(
        self,
        repo: TrustedRepository,
        booted: _Booted,
        version: Version | None,
        *,
        allow_downgrade: bool,
        ignore_waves: bool,
    ) -> Release:
        if version is None:
            channel, selection = self._candidate(repo, booted, ignore_waves=ignore_waves)
            where = f"{booted.image} ({self.machine.arch}) in channel {channel.channel}"
            if selection.release is None:
                self._record(f"up to date ({booted.version})", ok=True)
                skipped = "; ".join(selection.reasons)
                raise RefusedError(
                    f"refused to apply: no release newer than the booted {booted.version} to "
                    f"install for {where}" + (f" (skipped {skipped})" if skipped else "")
                )
        else:
            selection = select_version(
                self._channel(repo),
                version,
                image=booted.image,
                arch=self.machine.arch,
                booted=booted.version,
                allow_downgrade=allow_downgrade,
            )
            if selection.release is None:
                reason = "; ".join(s.reason for s in selection.skipped)
                raise RefusedError(f"refused to install {version}: {reason}")
        release = selection.release
        self._record(f"{release.version} selected for install", ok=True)
        return release

    def _fetch_manifest(self, info: TargetInfo, release: Release) -> Manifest:
        if info.length > _MANIFEST_LIMIT:
            raise ReleaseMismatchError(
                f"refused {release.label}: its signed manifest.json is {info.length} bytes, "
                f"more than a release manifest can be ({_MANIFEST_LIMIT})"
            )
        with tempfile.TemporaryFile() as f:
            self._stream(_MANIFEST, info, f, 0)
            f.seek(0)
            text = f.read().decode("utf-8", errors="replace")
        try:
            return Manifest.from_json(text, f"{release.label} manifest.json")
        except ManifestError as e:
            raise ReleaseMismatchError(f"refused {release.label}: {e}") from None

    def _check_release(
        self, release: Release, manifest: Manifest, infos: dict[str, TargetInfo], booted: _Booted
    ) -> None:
        what = f"refused {release.label}"
        for field_name, have, want in (
            ("image", manifest.image, booted.image),
            ("architecture", manifest.arch, self.machine.arch),
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

    def _probe(self, session: requests.Session, name: str, info: TargetInfo) -> None:
        """Refuse a payload URL that is unreachable or declares another length, before writing."""
        url = info.url
        try:
            response = session.head(
                url,
                timeout=self.fetch_options.timeout,
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

    def _check_esp_space(self, uki: TargetInfo, freed: int) -> None:
        try:
            free = shutil.disk_usage(self.machine.esp).free
        except OSError as e:
            raise StorageError(f"cannot measure free space on the ESP: {e}") from e
        if uki.length > free + freed:
            raise SlotError(
                f"refused: uki.efi is {uki.length} bytes but the ESP {self.machine.esp} has "
                f"{free + freed} bytes free"
            )

    def apply(
        self,
        version: Version | None = None,
        *,
        allow_downgrade: bool = False,
        ignore_waves: bool = False,
        progress: ProgressCallback | None = None,
    ) -> Applied:
        """Install the selected (or the given) release into the inactive slot; see the module
        docstring for the order of steps. Raises an UpdateError subclass on any refusal."""
        booted = self._booted()
        repo = self.repository()
        esp = self.machine.esp

        # (1) refresh and select
        release = self._select(
            repo, booted, version, allow_downgrade=allow_downgrade, ignore_waves=ignore_waves
        )
        # (2) signed target info, the release manifest, reachability of the payload
        infos = {name: repo.target_info(release.targets[name]) for name in RELEASE_TARGETS}
        manifest = self._fetch_manifest(infos[_MANIFEST], release)
        self._check_release(release, manifest, infos, booted)
        with requests.Session() as session:
            session.headers["User-Agent"] = "berth-update"
            for name in (_DATA, _VERITY, _UKI):
                self._probe(session, name, infos[name])

            with self.machine.disk.open("r+b") as disk:
                pair = slots.read_slots(disk)
                current = slots.booted_slot(pair, booted.roothash)
                target = slots.inactive_slot(pair, booted.roothash)
                # (3) space
                slots.check_space(
                    target, {_DATA: infos[_DATA].length, _VERITY: infos[_VERITY].length}
                )
                entries = bootentries.list_entries(esp)
                old = target.version if target.state is slots.SlotState.INSTALLED else None
                leaving = [e for e in entries if e.version in {old, release.version}]
                self._check_esp_space(infos[_UKI], sum(e.path.stat().st_size for e in leaving))
                # (4) sanity: never the running root
                if target.roothash == booted.roothash or target.name == current.name:
                    raise SlotError(
                        f"refused to install {release.version}: slot {target.name} is the booted "
                        "one"
                    )
                # An entry that boots before the running one must not outlive its root (see the
                # module docstring); it is the only ESP change before the slot is written.
                if old is not None and entries and entries[0].version == old:
                    bootentries.remove_entries(esp, old)
                state = self._load()
                if state.pending is not None and state.pending.slot == str(target.name):
                    self._save(replace(state, pending=None))
                # (5) the slot becomes scratch
                target = slots.prepare_slot(disk, target, booted=booted.roothash)

            # (6) stream the hash tree, then the root, into the slot; (7) check the tree
            where = f"slot {target.name}"
            with open_partition(self.machine.disk, target.verity_number, target.verity) as (
                tree,
                tree_offset,
            ):
                self._stream(
                    _VERITY,
                    infos[_VERITY],
                    tree,
                    tree_offset,
                    session=session,
                    progress=progress,
                    into_slot=True,
                )
                superblock = verity.read_superblock(tree.fileno(), tree_offset, where)
                superblock.check(infos[_DATA].length, f"{where} ({_VERITY})")
                blocks = verity.BlockHashes(superblock.salt)
                with open_partition(self.machine.disk, target.data_number, target.data) as (
                    data,
                    data_offset,
                ):
                    self._stream(
                        _DATA,
                        infos[_DATA],
                        data,
                        data_offset,
                        session=session,
                        progress=progress,
                        into_slot=True,
                        blocks=blocks,
                    )
                verity.check_tree(
                    tree.fileno(),
                    tree_offset,
                    superblock,
                    blocks.finish(f"{where} ({_DATA})"),
                    release.roothash,
                    where,
                )
            # (8) name the slot (gpt writes and fsyncs both table copies)
            with self.machine.disk.open("r+b") as disk:
                target = slots.commit_slot(disk, target, release.version, release.roothash)
            # (9) entries whose root is gone, or that would clash with the new one
            for stale in {old, release.version} - {None}:
                assert stale is not None
                bootentries.remove_entries(esp, stale)
            # (10) the UKI: temporary name, fsync, rename with a boot counter (the last step)
            uki = infos[_UKI]
            with bootentries.staged_uki(esp, release.version) as out:
                self._stream(_UKI, uki, out, 0, session=session, progress=progress)
        entry = bootentries.entry_dir(esp) / bootentries.entry_name(
            release.version, bootentries.DEFAULT_TRIES
        )
        # (11) remember, and tell whoever reboots
        state = self._load()
        if version is not None:
            state = state.without_bad(release.version)  # an explicit request lifts the mark
        state = replace(
            state,
            pending=Pending(
                release.version, str(target.name), release.roothash, self._now(), self._boot_id()
            ),
            last_check=LastCheck(self._now(), f"{release.version} installed", True),
        )
        self._save(state)
        write_reboot_required(self.machine)
        log.info("installed %s into slot %s; a reboot starts it", release.version, target.name)
        return Applied(release.version, str(target.name), release.roothash, entry)

    # -- after a boot --------------------------------------------------------------------------

    def after_boot(self) -> AfterBoot:
        """Judge the boot that just happened: a fallback marks the newer version bad; a good
        boot of the pending version makes it current and prunes UKIs older than the previous."""
        booted = self._booted()
        esp = self.machine.esp
        state = replace(self._load(), last_booted=booted.version)
        boot_id = self._boot_id()
        entries = bootentries.list_entries(esp)
        loaded = bootentries.loaded_versions(self.machine.loader_entries)
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
                # systemd-boot could not load the file (a power cut left it incomplete, say):
                # the boot loader never chose against it, so this is no rollback. Without its
                # entry the version is not installed; the next check installs it again.
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
            if any(e.state is bootentries.EntryState.BAD for e in mine):
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
            state = state.with_bad(version, reason, self._now())
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
                pruned = self._prune(booted)
            else:
                waiting = True  # systemd-bless-boot has not run yet: judge on a later call
        self._save(state)
        return AfterBoot(
            booted.version,
            tuple(rolled),
            tuple(reasons),
            blessed,
            waiting,
            tuple(pruned),
            tuple(damaged),
        )

    def _prune(self, booted: _Booted) -> list[str]:
        pair = self._slots()
        other = slots.inactive_slot(pair, booted.roothash)
        previous = other.version if other.state is slots.SlotState.INSTALLED else None
        floor = previous if previous is not None and previous < booted.version else booted.version
        keep = {e.version for e in bootentries.list_entries(self.machine.esp) if e.version >= floor}
        return [p.name for p in bootentries.prune(self.machine.esp, keep)]

    def _stream(
        self,
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
        partition (`into_slot`: resumable, O_DIRECT) or into a new file (the manifest, the
        UKI's temporary file on the ESP: small, nothing to resume)."""
        fetch.stream_to(
            info.url,
            dest,
            offset,
            info.length,
            info.sha256,
            options=self.fetch_options,
            session=session,
            state_path=self.machine.state_dir / f"download-{name}.json" if into_slot else None,
            progress=_bind(progress, name, info.length),
            direct=into_slot,
            blocks=blocks,
        )

    def verify_pending(self) -> Version:
        """Re-verify the pending slot against its signed root hash before rebooting into it.

        Bytes that changed after the install (a failing disk, a tampering process) must not get
        as far as the boot loader. On a mismatch the version's boot entries are removed and it
        is marked bad, and the VerificationError says why; the running system is untouched.
        """
        state = self._load()
        pending = state.pending
        if pending is None:
            raise RefusedError("nothing is pending: there is no installed update to verify")
        slot = next((s for s in self._slots() if str(s.name) == pending.slot), None)
        if slot is None:
            raise SlotError(
                f"the pending {pending.version} names slot {pending.slot}, which is gone"
            )
        try:
            with self.machine.disk.open("rb") as disk:
                size = slots.verity_data_size(disk, slot)
            slots.verify_slot(self.machine.disk, slot, pending.roothash, size)
        except VerificationError as e:
            bootentries.remove_entries(self.machine.esp, pending.version)
            reason = (
                f"refused to boot {pending.version}: slot {slot.name} changed after it was "
                f"installed ({e})"
            )
            state = replace(state.with_bad(pending.version, reason, self._now()), pending=None)
            self._save(state)
            raise VerificationError(reason) from e
        return pending.version

    def reject_trial(self, reason: str) -> Version | None:
        """The booted version, on trial, failed its health check: mark it bad now.

        Its entries get zero tries left, so the next boot is the previous version (rather than
        this one again until the counter runs out), and the reason is recorded where status and
        after-boot find it. Returns the rejected version, or None when the booted entry is
        blessed (a failing check on a blessed boot changes nothing; it is only logged).
        """
        booted = self._booted()
        mine = [
            e for e in bootentries.list_entries(self.machine.esp) if e.version == booted.version
        ]
        if not any(e.state is bootentries.EntryState.INDETERMINATE for e in mine):
            return None
        bootentries.mark_bad(self.machine.esp, booted.version)
        state = self._load()
        state = state.with_bad(
            booted.version, f"rolled back from {booted.version}: {reason}", self._now()
        )
        if state.pending is not None and state.pending.version == booted.version:
            state = replace(state, pending=None)
        self._save(state)
        return booted.version

    # -- rollback ------------------------------------------------------------------------------

    def rollback(self) -> RolledBack:
        """Boot the previous version (the other slot) next, by the operator's choice."""
        booted = self._booted()
        other = slots.inactive_slot(self._slots(), booted.roothash)
        previous = other.version
        if other.state is not slots.SlotState.INSTALLED or previous is None:
            raise RefusedError(
                f"refused to roll back: slot {other.name} is {other.state}, there is no previous "
                "version to go back to"
            )
        if previous >= booted.version:
            raise RefusedError(
                f"refused to roll back: slot {other.name} holds {previous}, which is not older "
                f"than the booted {booted.version} (install it with apply --version {previous})"
            )
        if previous not in {e.version for e in bootentries.list_entries(self.machine.esp)}:
            raise RefusedError(
                f"refused to roll back to {previous}: its UKI is not on the ESP {self.machine.esp}"
            )
        renamed = bootentries.set_next_boot(self.machine.esp, previous)
        state = self._load().with_bad(booted.version, "rolled back by the operator", self._now())
        self._save(state)
        write_reboot_required(self.machine)
        return RolledBack(booted.version, previous, tuple((a.name, b.name) for a, b in renamed))


def _bind(progress: ProgressCallback | None, name: str, total: int) -> Callable[[int], None] | None:
    if progress is None:
        return None
    report = progress

    def call(done: int) -> None:
        report(name, done, total)

    return call
