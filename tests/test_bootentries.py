"""updater.disk.bootentries in a temporary ESP directory."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from updater.disk import bootentries
from updater.disk.bootentries import Entry, EntryState
from updater.errors import BootEntryError
from updater.release.version import Version

V1, V2, V3 = Version(1, 0, 0), Version(1, 1, 0), Version(1, 10, 0)
UKI = b"MZ" + bytes(4094) + b"uki"


def names(esp: Path) -> list[str]:
    return sorted(p.name for p in (esp / "EFI/Linux").iterdir())


def put(esp: Path, *files: str) -> None:
    directory = esp / "EFI/Linux"
    directory.mkdir(parents=True, exist_ok=True)
    for name in files:
        (directory / name).write_bytes(name.encode())


def ordered(esp: Path) -> list[str]:
    return [e.name for e in bootentries.list_entries(esp)]


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("berth_1.0.0.efi", (V1, None, None)),
        ("berth_1.0.0+3.efi", (V1, 3, 0)),
        ("berth_1.10.0+2-1.efi", (V3, 2, 1)),
        ("berth_1.1.0+0-3.EFI", (V2, 0, 3)),
        ("berth_1.0.efi", None),
        ("berth_1.0.0+x.efi", None),
        ("berth_01.0.0.efi", None),
        (".berth_1.0.0.efi.tmp", None),
        ("debian_6.12.efi", None),
    ],
)
def test_parse_entry_name(name: str, parsed: tuple[Version, int | None, int | None] | None) -> None:
    assert bootentries.parse_entry_name(name) == parsed


def test_list_entries_in_systemd_boot_order(tmp_path: Path) -> None:
    put(
        tmp_path,
        "berth_1.0.0.efi",
        "berth_1.10.0+0-3.efi",
        "berth_1.1.0+2-1.efi",
        "other.efi",
        ".berth_1.2.0.efi.tmp",
    )
    entries = bootentries.list_entries(tmp_path)
    # 1.10.0 is newest but bad: last. 1.1.0 sorts before 1.0.0 (numeric, newest first).
    assert [e.name for e in entries] == [
        "berth_1.1.0+2-1.efi",
        "berth_1.0.0.efi",
        "berth_1.10.0+0-3.efi",
    ]
    assert [e.state for e in entries] == [EntryState.INDETERMINATE, EntryState.GOOD, EntryState.BAD]
    assert entries[0] == Entry(V2, 2, 1, tmp_path / "EFI/Linux/berth_1.1.0+2-1.efi")
    assert bootentries.list_entries(tmp_path / "nothing") == []


def test_install_uki_from_path_and_stream(tmp_path: Path) -> None:
    esp = tmp_path / "esp"
    source = tmp_path / "uki.efi"
    source.write_bytes(UKI)
    path = bootentries.install_uki(esp, V1, source)
    assert path == esp / "EFI/Linux/berth_1.0.0+3.efi"
    assert path.read_bytes() == UKI
    bootentries.install_uki(esp, V2, io.BytesIO(UKI), tries=1)
    assert names(esp) == ["berth_1.0.0+3.efi", "berth_1.1.0+1.efi"]
    assert ordered(esp)[0] == "berth_1.1.0+1.efi"


def test_nothing_bootable_appears_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(tmp_path, "berth_1.0.0.efi")
    seen_during_write: list[list[str]] = []

    def failing_rename(source: object, target: object) -> None:
        seen_during_write.append(names(tmp_path))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(BootEntryError, match=r"renaming boot entry \.berth_1\.1\.0\.efi\.tmp"):
        bootentries.install_uki(tmp_path, V2, io.BytesIO(UKI))
    # Just before the rename the whole UKI sat under a name systemd-boot ignores...
    assert seen_during_write == [[".berth_1.1.0.efi.tmp", "berth_1.0.0.efi"]]
    # ...and after the failure the ESP is as it was.
    assert names(tmp_path) == ["berth_1.0.0.efi"]


def test_a_failed_write_leaves_no_trace(tmp_path: Path) -> None:
    put(tmp_path, "berth_1.0.0.efi")
    with pytest.raises(RuntimeError), bootentries.staged_uki(tmp_path, V2) as f:
        f.write(UKI[:100])
        raise RuntimeError("download failed")
    assert names(tmp_path) == ["berth_1.0.0.efi"]


def test_install_refuses_a_version_already_there(tmp_path: Path) -> None:
    put(tmp_path, "berth_1.1.0+0-3.efi")
    with pytest.raises(BootEntryError, match=r"berth_1\.1\.0\+0-3\.efi is already on the ESP"):
        bootentries.install_uki(tmp_path, V2, io.BytesIO(UKI))
    assert names(tmp_path) == ["berth_1.1.0+0-3.efi"]


def test_mark_bad(tmp_path: Path) -> None:
    put(tmp_path, "berth_1.0.0.efi", "berth_1.1.0+1-2.efi")
    assert bootentries.mark_bad(tmp_path, V2) == [tmp_path / "EFI/Linux/berth_1.1.0+0-2.efi"]
    assert ordered(tmp_path) == ["berth_1.0.0.efi", "berth_1.1.0+0-2.efi"]
    assert bootentries.mark_bad(tmp_path, V1) == [tmp_path / "EFI/Linux/berth_1.0.0+0.efi"]
    assert bootentries.mark_bad(tmp_path, V1) == []  # already bad: nothing to do
    with pytest.raises(BootEntryError, match=r"no boot entry for 1\.10\.0 on the ESP"):
        bootentries.mark_bad(tmp_path, V3)


def test_prune_keeps_what_it_is_told(tmp_path: Path) -> None:
    put(
        tmp_path,
        "berth_1.0.0.efi",
        "berth_1.1.0+2-1.efi",
        "berth_1.10.0.efi",
        "other.efi",
        ".berth_1.2.0.efi.tmp",
    )
    removed = bootentries.prune(tmp_path, keep={V2, V3})
    assert sorted(p.name for p in removed) == [".berth_1.2.0.efi.tmp", "berth_1.0.0.efi"]
    assert names(tmp_path) == ["berth_1.1.0+2-1.efi", "berth_1.10.0.efi", "other.efi"]


def test_remove_entries(tmp_path: Path) -> None:
    put(tmp_path, "berth_1.0.0.efi", "berth_1.1.0+0-3.efi")
    assert bootentries.remove_entries(tmp_path, V2) == [tmp_path / "EFI/Linux/berth_1.1.0+0-3.efi"]
    assert names(tmp_path) == ["berth_1.0.0.efi"]


def test_set_next_boot_rolls_back_to_the_previous_version(tmp_path: Path) -> None:
    put(tmp_path, "berth_1.0.0.efi", "berth_1.1.0.efi", "berth_1.10.0+3.efi")
    assert ordered(tmp_path)[0] == "berth_1.10.0+3.efi"
    renames = bootentries.set_next_boot(tmp_path, V1)
    # In boot order: the entry that would boot next is the first to step aside.
    assert [(a.name, b.name) for a, b in renames] == [
        ("berth_1.10.0+3.efi", "berth_1.10.0+0.efi"),
        ("berth_1.1.0.efi", "berth_1.1.0+0.efi"),
    ]
    assert ordered(tmp_path)[0] == "berth_1.0.0.efi"
    # Asking again changes nothing.
    assert bootentries.set_next_boot(tmp_path, V1) == []


def test_set_next_boot_to_a_bad_entry_gives_it_a_fresh_trial(tmp_path: Path) -> None:
    put(tmp_path, "berth_1.0.0+0-3.efi", "berth_1.1.0.efi")
    plan = bootentries.plan_next_boot(bootentries.list_entries(tmp_path), V1)
    assert [(a.name, b.name) for a, b in plan] == [
        ("berth_1.1.0.efi", "berth_1.1.0+0.efi"),
        ("berth_1.0.0+0-3.efi", "berth_1.0.0+3.efi"),
    ]
    bootentries.set_next_boot(tmp_path, V1)
    assert ordered(tmp_path) == ["berth_1.0.0+3.efi", "berth_1.1.0+0.efi"]


def test_set_next_boot_refuses_an_unknown_version(tmp_path: Path) -> None:
    put(tmp_path, "berth_1.1.0.efi")
    with pytest.raises(BootEntryError, match=r"refused to boot 1\.0\.0 next.*berth_1\.1\.0\.efi"):
        bootentries.set_next_boot(tmp_path, V1)
    assert names(tmp_path) == ["berth_1.1.0.efi"]


def efivar(tmp_path: Path, value: str) -> Path:
    path = tmp_path / "LoaderEntrySelected"
    path.write_bytes(b"\x06\x00\x00\x00" + (value + "\0").encode("utf-16-le"))
    return path


def test_booted_entry_reads_the_efi_variable(tmp_path: Path) -> None:
    path = efivar(tmp_path, "berth_1.1.0+2-1.efi")
    assert bootentries.booted_entry(path) == "berth_1.1.0+2-1.efi"
    assert bootentries.booted_version(path) == V2
    assert bootentries.booted_version(efivar(tmp_path, "auto-reboot-to-firmware-setup")) is None
    assert bootentries.booted_entry(tmp_path / "missing") is None


def test_loaded_versions_reads_loader_entries(tmp_path: Path) -> None:
    path = tmp_path / "LoaderEntries"
    assert bootentries.loaded_versions(path) is None
    names = ["berth_1.0.0.efi", "berth_2.0.0+2-1.efi", "auto-reboot-to-firmware-setup", "x.conf"]
    path.write_bytes((7).to_bytes(4, "little") + ("\0".join(names) + "\0").encode("utf-16-le"))
    assert bootentries.loaded_versions(path) == {Version(1, 0, 0), Version(2, 0, 0)}
    path.write_bytes((7).to_bytes(4, "little"))
    assert bootentries.loaded_versions(path) == set()


def test_rename_keeps_the_bytes_under_the_new_name(tmp_path: Path) -> None:
    directory = tmp_path / bootentries.ENTRY_DIR
    directory.mkdir(parents=True)
    (directory / "berth_1.0.0+3.efi").write_bytes(b"uki")
    assert bootentries.mark_bad(tmp_path, Version(1, 0, 0)) == [directory / "berth_1.0.0+0.efi"]
    assert (directory / "berth_1.0.0+0.efi").read_bytes() == b"uki"
