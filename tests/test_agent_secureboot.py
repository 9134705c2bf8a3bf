"""Agent.apply with Secure Boot enforced: a UKI the firmware would refuse is never installed,
and refusing it leaves the disk, the ESP and the boot order byte-identical."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.publish import secureboot
from tests.support.machine import FakeMachine, Site, make_agent
from tests.support.secureboot import SYSTEMD_BOOT, sbsign, set_flags, signature_lists
from updater.disk import authenticode
from updater.errors import VerificationError
from updater.release.version import Version


def sign(keys: Path, out: Path) -> bytes:
    return sbsign(SYSTEMD_BOOT, keys / "db.key", keys / "db.crt", out)


def enforce(fake: FakeMachine, db_cert: Path, tmp_path: Path) -> None:
    """Secure Boot on, in user mode, with `db_cert` in db (written by efitools)."""
    set_flags(fake.efivars, SecureBoot=1, SetupMode=0)
    db = fake.efivars / f"db-{authenticode.SECURITY_GUID}"
    db.write_bytes(signature_lists(tmp_path, db_cert))


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    secureboot.init_secureboot_keys(tmp_path / "sb-keys")
    return tmp_path / "sb-keys/secureboot"


def test_a_uki_signed_by_db_is_installed(
    site: Site, fake: FakeMachine, keys: Path, tmp_path: Path
) -> None:
    enforce(fake, keys / "db.crt", tmp_path)
    uki = sign(keys, tmp_path / "uki.efi")
    site.publish(site.release("2.0.0", uki=uki))
    applied = make_agent(fake, site).apply()
    assert applied.entry.read_bytes() == uki
    assert not (fake.var / "lib/berth/uki.checked.tmp").exists()


@pytest.mark.parametrize("kind", ["another key", "no signature"])
def test_a_uki_the_firmware_would_refuse_is_never_installed(
    site: Site, fake: FakeMachine, keys: Path, tmp_path: Path, kind: str
) -> None:
    enforce(fake, keys / "db.crt", tmp_path)
    if kind == "another key":
        secureboot.init_secureboot_keys(tmp_path / "other", owner="Someone Else")
        uki = sign(tmp_path / "other/secureboot", tmp_path / "uki.efi")
        pattern = r"refused the UKI of 2\.0\.0: signed by CN=Someone Else Secure Boot db \(sha256 "
    else:
        uki = SYSTEMD_BOOT.read_bytes()
        pattern = r"refused the UKI of 2\.0\.0: it is not signed, and Secure Boot is enforced"
    site.publish(site.release("2.0.0", uki=uki))
    before = fake.snapshot()
    with pytest.raises(VerificationError, match=pattern):
        make_agent(fake, site).apply()
    assert fake.snapshot() == before  # the disk, the ESP (names and bytes) and the boot order
    assert not (fake.var / "lib/berth/uki.checked.tmp").exists()
    assert not (fake.run / "reboot-required").exists()


def test_without_secure_boot_enforced_the_uki_is_not_checked(
    site: Site, fake: FakeMachine, tmp_path: Path
) -> None:
    # Setup mode: the firmware checks nothing, so neither does the agent (a random UKI passes).
    set_flags(fake.efivars, SecureBoot=0, SetupMode=1)
    site.publish(site.release("2.0.0"))
    assert make_agent(fake, site).apply().entry.exists()


def test_entries_the_firmware_would_refuse_are_set_aside_and_the_rest_kept(
    fake: FakeMachine, keys: Path, tmp_path: Path
) -> None:
    from updater.update.bootcheck import set_aside_refused

    enforce(fake, keys / "db.crt", tmp_path)
    linux = fake.esp / "EFI/Linux"
    good = sign(keys, tmp_path / "good.efi")
    secureboot.init_secureboot_keys(tmp_path / "other", owner="Someone Else")
    foreign = sign(tmp_path / "other/secureboot", tmp_path / "foreign.efi")
    # Put there by hand: the newest Berth entry with a counter, one under any other name (which
    # systemd-boot boots too), an unsigned one, and an upper-case suffix (FAT is case-blind).
    files = {
        "berth_1.0.0.efi": good,
        "berth_9.9.9+3.efi": foreign,
        "evil.efi": foreign,
        "berth_8.0.0.EFI": SYSTEMD_BOOT.read_bytes(),
        "notes.txt": b"left alone",
    }
    for name, data in files.items():
        (linux / name).write_bytes(data)
    refused = set_aside_refused(fake.esp, fake.efivars, None)
    assert sorted(r.name for r in refused) == ["berth_8.0.0.EFI", "berth_9.9.9+3.efi", "evil.efi"]
    reasons = {r.name: r.reason for r in refused}
    assert reasons["evil.efi"].startswith("signed by CN=Someone Else Secure Boot db (sha256 ")
    assert "it is not signed" in reasons["berth_8.0.0.EFI"]
    after = {p.name: p.read_bytes() for p in linux.iterdir()}
    assert after == {
        "berth_1.0.0.efi": good,
        "berth_9.9.9+3.efi.refused": foreign,
        "evil.efi.refused": foreign,
        "berth_8.0.0.EFI.refused": SYSTEMD_BOOT.read_bytes(),
        "notes.txt": b"left alone",
    }
    # Nothing left to refuse: a second run changes nothing.
    assert set_aside_refused(fake.esp, fake.efivars, None) == []


def test_without_secure_boot_enforced_no_entry_is_set_aside(
    fake: FakeMachine, keys: Path, tmp_path: Path
) -> None:
    from updater.update.bootcheck import set_aside_refused

    set_flags(fake.efivars, SecureBoot=0, SetupMode=1)
    (fake.esp / "EFI/Linux/berth_9.9.9+3.efi").write_bytes(SYSTEMD_BOOT.read_bytes())
    before = fake.snapshot()
    assert set_aside_refused(fake.esp, fake.efivars, None) == []
    assert fake.snapshot() == before


def test_check_entries_and_after_boot_say_what_they_set_aside(
    site: Site, fake: FakeMachine, keys: Path, tmp_path: Path
) -> None:
    import io

    from updater import cli

    enforce(fake, keys / "db.crt", tmp_path)
    agent = make_agent(fake, site)
    (fake.esp / "EFI/Linux/berth_9.9.9+3.efi").write_bytes(SYSTEMD_BOOT.read_bytes())
    out = io.StringIO()
    assert cli.main(["check-entries"], agent_factory=lambda: agent, out=out) == 0
    assert out.getvalue().startswith("set aside berth_9.9.9+3.efi: it is not signed")
    (fake.esp / "EFI/Linux/berth_9.9.9+2-1.efi").write_bytes(SYSTEMD_BOOT.read_bytes())
    result = agent.after_boot()
    assert result.refused == ("berth_9.9.9+2-1.efi",)
    assert result.rolled_back_from == ()  # never tried: no fallback to judge


def test_a_type1_entry_naming_an_image_the_firmware_would_refuse_is_set_aside(
    fake: FakeMachine, keys: Path, tmp_path: Path
) -> None:
    from updater.update.bootcheck import set_aside_refused

    enforce(fake, keys / "db.crt", tmp_path)
    (fake.esp / "vmlinuz.efi").write_bytes(SYSTEMD_BOOT.read_bytes())  # unsigned
    (fake.esp / "signed.efi").write_bytes(sign(keys, tmp_path / "signed.efi"))
    entries = fake.esp / "loader/entries"
    entries.mkdir(parents=True)
    (entries / "evil.conf").write_text("title Evil\nversion 99\nlinux /vmlinuz.efi\n")
    (entries / "fine.conf").write_text("title Fine\nefi \\\\signed.efi\n")
    (entries / "gone.conf").write_text("title Gone\nlinux /missing.efi\n")
    refused = set_aside_refused(fake.esp, fake.efivars, Version.parse("1.0.0"))
    assert [(r.name, r.reason.split(":")[0]) for r in refused] == [
        ("evil.conf", "image vmlinuz.efi")
    ]
    assert sorted(p.name for p in entries.iterdir()) == [
        "evil.conf.refused",
        "fine.conf",
        "gone.conf",
    ]
