"""A fake Berth machine and a signed repository for agent tests, with real verity payloads.

`FakeMachine` is a sparse GPT disk image in Berth's layout (ESP, root A + verity holding an
installed version, empty root B + verity, STATE), an ESP directory with that version's UKI, and
the files the agent reads on a device (/proc/cmdline with roothash=, LoaderEntrySelected,
/etc/os-release, /etc/machine-id, a boot id) under a temporary directory.

`make_verity_release` writes a release directory whose root.erofs is random data hashed by the
host's real `veritysetup format`, so that apply's verity check really runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from builder import publish as pub
from builder.disk import PartitionImage, make_disk
from builder.run import run
from tests.support.servers import NginxServer
from updater.agent import Agent
from updater.config import UpdateConfig
from updater.disk import bootentries, gpt, slots
from updater.release.manifest import PAYLOAD_FILES, Manifest, describe
from updater.release.version import Version
from updater.update.machine import FetchOptions, Machine

MiB = 1 << 20
IMAGE = "containerhost"
ARCH = "x86_64"
MACHINE_ID = "5f0c1e2d3b4a69788796a5b4c3d2e1f0"
VERITYSETUP = "/usr/sbin/veritysetup"
SLOT_DATA = 4 * MiB
SLOT_VERITY = 1 * MiB


def make_verity_release(
    out: Path,
    version: str,
    *,
    image: str = IMAGE,
    arch: str = ARCH,
    data_size: int = 256 * 1024,
    data: bytes | None = None,
    uki: bytes | None = None,
) -> Path:
    """A release directory `out/<image>/<version>/` with a real dm-verity root and hash tree:
    random data, or `data`; a random UKI, or `uki`. The salt is the image's, as the builder's
    (builder/verity.py): releases of one image hash their blocks alike."""
    if data is None:
        data = os.urandom(data_size)
    if len(data) % 4096:
        raise ValueError("verity data must be whole 4096-byte blocks")
    release = out / image / version
    release.mkdir(parents=True)
    (release / "root.erofs").write_bytes(data)
    salt = hashlib.sha256(f"berth-verity-salt:{image}".encode()).hexdigest()
    result = run(
        [VERITYSETUP, "format", f"--salt={salt}", release / "root.erofs", release / "root.verity"],
        capture=True,
    )
    match = re.search(r"Root hash:\s+([0-9a-f]{64})", result.stdout.decode())
    assert match, result.stdout
    (release / "uki.efi").write_bytes(b"MZ" + os.urandom(20_000) if uki is None else uki)
    manifest = Manifest(
        image=image,
        version=Version.parse(version),
        arch=arch,
        roothash=match[1],
        files=describe({name: release / name for name in PAYLOAD_FILES}),
    )
    (release / "manifest.json").write_text(manifest.to_json())
    return release


def release_manifest(release: Path) -> Manifest:
    return Manifest.from_json((release / "manifest.json").read_text())


def efi_string_variable(value: str) -> bytes:
    """An efivarfs file: 4 bytes of attributes, then a NUL-terminated UTF-16LE string."""
    return (7).to_bytes(4, "little") + (value + "\0").encode("utf-16-le")


@dataclass(frozen=True)
class Snapshot:
    """Everything the refusal rules promise to keep, hashed."""

    disk: str
    esp: tuple[tuple[str, str], ...]
    boot_order: tuple[str, ...]


class FakeMachine:
    def __init__(self, base: Path, installed: Path) -> None:
        """`installed`: a release directory (make_verity_release) that slot A holds, booted."""
        self.base = base
        self.installed = installed
        manifest = release_manifest(installed)
        self.version = manifest.version
        self.roothash = manifest.roothash
        root = base / "root"
        self.disk = base / "disk.raw"
        self.esp = base / "esp"
        self.var = root / "var"
        self.run = root / "run"
        for d in (
            self.esp / bootentries.ENTRY_DIR,
            self.var,
            self.run,
            root / "etc",
            root / "proc",
        ):
            d.mkdir(parents=True, exist_ok=True)
        data_uuid, verity_uuid = gpt.uuid_pair_from_roothash(self.roothash)
        ro = gpt.ATTR_READ_ONLY
        spec = gpt.PartitionSpec
        make_disk(
            [
                PartitionImage(spec(gpt.ESP, "ESP", MiB, uuid.UUID(int=0xE5)), None),
                PartitionImage(
                    spec(gpt.ROOT_X86_64, f"berth_{self.version}", SLOT_DATA, data_uuid),
                    installed / "root.erofs",
                    ro,
                ),
                PartitionImage(
                    spec(
                        gpt.ROOT_X86_64_VERITY,
                        f"berth_{self.version}_verity",
                        SLOT_VERITY,
                        verity_uuid,
                    ),
                    installed / "root.verity",
                    ro,
                ),
                PartitionImage(
                    spec(gpt.ROOT_X86_64, "_empty", SLOT_DATA, uuid.UUID(int=0xB1)), None, ro
                ),
                PartitionImage(
                    spec(gpt.ROOT_X86_64_VERITY, "_empty", SLOT_VERITY, uuid.UUID(int=0xB2)),
                    None,
                    ro,
                ),
                PartitionImage(spec(gpt.LINUX_GENERIC, "STATE", MiB, uuid.UUID(int=0x57)), None),
            ],
            self.disk,
            "fake-machine",
        )
        shutil.copyfile(installed / "uki.efi", self.entry_dir / f"berth_{self.version}.efi")
        self.cmdline = root / "proc/cmdline"
        self.cmdline.write_text(f"console=ttyS0 roothash={self.roothash} ro quiet\n")
        self.loader_entry = root / "efivars/LoaderEntrySelected"
        self.loader_entry.parent.mkdir()
        self.loader_entries = root / "efivars/LoaderEntries"
        self.loader_entries_missing = False  # True: a boot loader without that variable
        self.efivars = root / "efivars"  # the Secure Boot variables go here, when a test sets them
        self.lockdown = root / "security/lockdown"
        self.tpm_class = root / "sys/class/tpm"  # empty: no TPM, unless a test adds tpm0
        self.os_release = root / "etc/os-release"
        self.machine_id = root / "etc/machine-id"
        self.machine_id.write_text(MACHINE_ID + "\n")
        self.boot_id = root / "proc/boot_id"
        self.boot(self.version, self.roothash)

    @property
    def entry_dir(self) -> Path:
        return self.esp / bootentries.ENTRY_DIR

    def boot(self, version: Version, roothash: str, unloadable: Collection[str] = ()) -> None:
        """Pretend the machine (re)booted into `version`: what the kernel and the loader say.
        The loader lists every entry on the ESP as loadable except the names in `unloadable`."""
        self.cmdline.write_text(f"console=ttyS0 roothash={roothash} ro quiet\n")
        on_esp = bootentries.list_entries(self.esp)
        entries = [e for e in on_esp if e.version == version]
        name = entries[0].name if entries else f"berth_{version}.efi"
        self.loader_entry.write_bytes(efi_string_variable(name))
        loaded = [e.name for e in on_esp if e.name not in unloadable]
        if self.loader_entries_missing:
            self.loader_entries.unlink(missing_ok=True)
        else:
            self.loader_entries.write_bytes(efi_string_variable("\0".join(loaded)))
        self.os_release.write_text(
            f'NAME="Berth"\nID=berth\nIMAGE_ID={IMAGE}\nIMAGE_VERSION="{version}"\n'
            f'VERSION_ID="{version}"\n'
        )
        self.boot_id.write_text(str(uuid.uuid4()) + "\n")

    def machine(self, trusted_root: Path) -> Machine:
        return Machine(
            disk=self.disk,
            esp=self.esp,
            var=self.var,
            cmdline=self.cmdline,
            loader_entry=self.loader_entry,
            os_release=self.os_release,
            machine_id=self.machine_id,
            trusted_root=trusted_root,
            boot_id=self.boot_id,
            loader_entries=self.loader_entries,
            reboot_required=self.run / "reboot-required",
            lock_dir=self.run / "berth",
            arch=ARCH,
            etc_list=self.base / "usr/lib/berth/etc.json",
            etc_upper=self.var / "lib/berth/etc/upper",
            efivars=self.efivars,
            lockdown=self.lockdown,
            state_report=self.run / "berth/state.json",
            tpm_class=self.tpm_class,
        )

    def slots(self) -> tuple[slots.Slot, slots.Slot]:
        with self.disk.open("rb") as f:
            return slots.read_slots(f)

    def region(self, offset: int, size: int) -> bytes:
        with self.disk.open("rb") as f:
            f.seek(offset)
            return f.read(size)

    def esp_tree(self) -> tuple[tuple[str, str], ...]:
        return tuple(
            (str(p.relative_to(self.esp)), hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(self.esp.rglob("*"))
            if p.is_file()
        )

    def boot_order(self) -> tuple[str, ...]:
        return tuple(e.name for e in bootentries.list_entries(self.esp))

    def snapshot(self) -> Snapshot:
        digest = hashlib.sha256()
        with self.disk.open("rb") as f:
            while block := f.read(MiB):
                digest.update(block)
        return Snapshot(digest.hexdigest(), self.esp_tree(), self.boot_order())

    def sfdisk(self) -> list[dict[str, Any]]:
        doc = json.loads(run(["sfdisk", "--json", self.disk], capture=True).stdout)
        parts: list[dict[str, Any]] = doc["partitiontable"]["partitions"]
        return parts


class Site:
    """Keys, a repository published by builder.publish into `repo`, served by nginx."""

    def __init__(self, base: Path, server: NginxServer) -> None:
        self.base = base
        self.keys = base / "keys"
        self.repo = base / "repo"
        self.server = server
        self.count = 0

    @property
    def url(self) -> str:
        return self.server.url

    def release(self, version: str, **options: Any) -> Path:
        self.count += 1
        return make_verity_release(self.base / f"out{self.count}", version, **options)

    def publish(
        self, release: Path, *, now: datetime | None = None, immediate: bool = True
    ) -> None:
        pub.publish(release, self.repo, self.keys, "stable", now=now, immediate=immediate)

    def payload(self, release: Path, name: str) -> Path:
        """The served file of one payload target (consistent snapshot name)."""
        m = release_manifest(release)
        sha = m.files[name].sha256
        return self.repo / "targets" / m.image / str(m.version) / f"{sha}.{name}"

    def config(self, url: str | None = None) -> UpdateConfig:
        return UpdateConfig(url=url or self.url, channel="stable")


def make_agent(
    fake: FakeMachine, site: Site, *, url: str | None = None, options: FetchOptions | None = None
) -> Agent:
    return Agent(
        fake.machine(site.keys / "root.json"),
        site.config(url),
        fetch_options=options
        or FetchOptions(
            timeout=(5.0, 5.0),
            attempts=2,
            backoff=0.0,
            state_interval=64 * 1024,
            state_seconds=0.0,
        ),
    )


def boot_into_update(fake: FakeMachine, site: Site, version: str) -> Path:
    """Publish `version`, install it and reboot into it: on trial, its entry still counted."""
    release = site.release(version)
    site.publish(release)
    make_agent(fake, site).apply()
    fake.boot(Version.parse(version), release_manifest(release).roothash)
    return release


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """Signing keys and an empty TUF repository served by nginx on loopback."""
    pub.init_keys(tmp_path / "keys")
    (tmp_path / "repo").mkdir()
    with NginxServer(tmp_path / "repo", tmp_path / "nginx") as server:
        yield Site(tmp_path, server)


@pytest.fixture
def fake(tmp_path: Path, site: Site) -> FakeMachine:
    """A machine (GPT disk image, ESP, cmdline) booted into 1.0.0 from slot A."""
    return FakeMachine(tmp_path / "machine", site.release("1.0.0"))
