"""builder.signing: PE images signed with the db key, reproducibly, as sbverify and the agent's
own check (updater.disk.authenticode) accept them."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.errors import BuildError
from builder.publish import secureboot
from builder.run import find_tool, run
from builder.signing import sign_file, sign_image
from tests.support.secureboot import SYSTEMD_BOOT
from updater.disk import authenticode
from updater.disk.authenticode import Database


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keys = tmp_path_factory.mktemp("sign") / "keys"
    secureboot.init_secureboot_keys(keys)
    secureboot.init_secureboot_keys(keys.with_name("other"), owner="Someone Else")
    return keys / "secureboot"


def sbverify(cert: Path, image: Path) -> bool:
    return (
        run([find_tool("sbverify"), "--cert", cert, image], check=False, quiet=True).returncode == 0
    )


def test_signed_images_pass_sbverify_and_the_agents_check(keys: Path, tmp_path: Path) -> None:
    image = tmp_path / "boot.efi"
    image.write_bytes(SYSTEMD_BOOT.read_bytes())
    sign_file(image, keys / "db.key", keys / "db.crt")
    assert sbverify(keys / "db.crt", image)
    assert not sbverify(keys.parent.with_name("other") / "secureboot/db.crt", image)
    db = Database((secureboot.load_certificate(keys / "db.crt"),))
    signature = authenticode.check_image(image.read_bytes(), db, Database(), "systemd-boot")
    assert signature.signer == secureboot.load_certificate(keys / "db.crt")


def test_signing_is_reproducible(keys: Path) -> None:
    image = SYSTEMD_BOOT.read_bytes()
    first = sign_image(image, keys / "db.key", keys / "db.crt", "systemd-boot")
    assert sign_image(image, keys / "db.key", keys / "db.crt", "systemd-boot") == first


def test_signing_again_replaces_the_signature(keys: Path, tmp_path: Path) -> None:
    other = keys.parent.with_name("other") / "secureboot"
    once = sign_image(SYSTEMD_BOOT.read_bytes(), other / "db.key", other / "db.crt", "boot")
    again = sign_image(once, keys / "db.key", keys / "db.crt", "boot")
    assert again == sign_image(SYSTEMD_BOOT.read_bytes(), keys / "db.key", keys / "db.crt", "b")
    (tmp_path / "again.efi").write_bytes(again)
    assert sbverify(keys / "db.crt", tmp_path / "again.efi")
    assert len(authenticode.signatures(again)) == 1


def test_what_is_not_a_pe_image_is_a_build_error(keys: Path) -> None:
    with pytest.raises(BuildError, match="cannot sign the UKI: not a signable PE image"):
        sign_image(b"MZ" + b"\0" * 200, keys / "db.key", keys / "db.crt", "the UKI")


def test_a_key_that_is_not_rsa_is_refused(keys: Path, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = tmp_path / "ed.key"
    key.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(BuildError, match="expected an RSA private key"):
        sign_image(SYSTEMD_BOOT.read_bytes(), key, keys / "db.crt", "systemd-boot")


def test_a_build_without_secure_boot_keys_makes_development_keys_loudly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from builder.image import secure_boot_key

    keys = tmp_path / "keys"
    key, cert = secure_boot_key(keys)
    assert (key, cert) == (keys / "secureboot/db.key", keys / "secureboot/db.crt")
    assert "NO SECURE BOOT KEYS" in capsys.readouterr().err
    # A second build uses them, quietly, and signs alike.
    assert secure_boot_key(keys) == (key, cert)
    assert "NO SECURE BOOT KEYS" not in capsys.readouterr().err


def test_a_build_whose_db_key_is_offline_stops_with_the_fix(tmp_path: Path) -> None:
    from builder.image import secure_boot_key

    keys = tmp_path / "keys"
    secureboot.init_secureboot_keys(keys)
    (keys / "secureboot/db.key").unlink()
    with pytest.raises(BuildError, match="db private key signs every build") as e:
        secure_boot_key(keys)
    assert "bring it back from offline storage" in (e.value.hint or "")


def _content_info(signed_data: bytes) -> bytes:
    """The bare SignedData wrapped in a ContentInfo, the form openssl cms reads."""
    from builder import signing

    return signing._seq(signing._oid(authenticode.OID_SIGNED_DATA), signing._der(0xA0, signed_data))


def test_enrolment_files_are_signed_key_lists_as_firmware_takes_them(
    keys: Path, tmp_path: Path
) -> None:
    import struct
    import uuid
    from datetime import UTC, datetime

    from builder import signing

    when = datetime(2026, 12, 1, 12, 30, 5, tzinfo=UTC)
    files = signing.enrolment_files(keys.parent, when)
    assert sorted(files) == ["KEK.auth", "PK.auth", "db.auth"]
    assert signing.enrolment_files(keys.parent, when) == files  # reproducible
    owner = secureboot.read_guid(keys.parent)
    for name, signer in (("PK", "PK"), ("KEK", "PK"), ("db", "KEK")):
        auth = files[f"{name}.auth"]
        assert struct.unpack_from("<HBBBBB", auth) == (2026, 12, 1, 12, 30, 5)
        length, revision, kind = struct.unpack_from("<IHH", auth, 16)
        assert (revision, kind) == (0x0200, 0x0EF1)
        assert uuid.UUID(bytes_le=auth[24:40]) == uuid.UUID("4aafd29d-68df-49ee-8aa9-347d375665a7")
        pkcs7, esl = auth[40 : 16 + length], auth[16 + length :]
        # The list is what efitools makes of the same certificate and owner.
        made = tmp_path / f"{name}.esl"
        run([find_tool("cert-to-efi-sig-list"), "-g", str(owner), keys / f"{name}.crt", made])
        assert esl == made.read_bytes()
        # UEFI reads SignedData bare, with its digest algorithm at a fixed offset (edk2 checks).
        assert pkcs7[0] == 0x30 and pkcs7[1] == 0x82
        assert pkcs7[13:22] == bytes.fromhex("608648016503040201")
        # The signature covers name, vendor GUID, attributes, time and the list; openssl agrees.
        vendor = signing.ENROLMENT[name][1]
        signed = name.encode("utf-16-le") + vendor.bytes_le + struct.pack("<I", 0x27)
        (tmp_path / "content").write_bytes(signed + auth[:16] + esl)
        (tmp_path / "sig.der").write_bytes(_content_info(pkcs7))
        run(
            [
                "openssl", "cms", "-verify", "-binary", "-inform", "DER",
                "-in", tmp_path / "sig.der", "-content", tmp_path / "content",
                "-CAfile", keys / f"{signer}.crt", "-purpose", "any", "-out", tmp_path / "out",
            ]
        )  # fmt: skip
        (tmp_path / "content").write_bytes(signed + auth[:16] + esl + b"x")
        bad = run(
            [
                "openssl", "cms", "-verify", "-binary", "-inform", "DER",
                "-in", tmp_path / "sig.der", "-content", tmp_path / "content",
                "-CAfile", keys / f"{signer}.crt", "-purpose", "any", "-out", tmp_path / "out",
            ],
            check=False,
            quiet=True,
        )  # fmt: skip
        assert bad.returncode != 0


def test_enrolment_files_need_pk_and_kek_back_from_offline(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from builder import signing

    keys = tmp_path / "keys"
    secureboot.init_secureboot_keys(keys)
    (keys / "secureboot/KEK.key").unlink()
    with pytest.raises(BuildError, match=r"db\.auth is signed with the KEK key") as e:
        signing.enrolment_files(keys, datetime(2026, 12, 1, tzinfo=UTC))
    assert "bring KEK.key back from offline storage" in (e.value.hint or "")


def test_enrolment_files_are_kept_beside_the_keys_and_made_again_after_a_db_rotation(
    tmp_path: Path,
) -> None:
    from builder import signing

    keys = tmp_path / "keys"
    secureboot.init_secureboot_keys(keys)
    directory = keys / "secureboot"
    made = signing.secureboot_enrolment(keys)
    assert made is not None and sorted(made) == ["KEK.auth", "PK.auth", "db.auth"]
    assert {name: (directory / name).read_bytes() for name in made} == made
    assert (directory / "db.auth").stat().st_mode & 0o777 == 0o644  # public, as the .crt files
    # PK and KEK go offline: builds still find the files they made.
    offline = tmp_path / "offline"
    offline.mkdir()
    for name in ("PK.key", "KEK.key"):
        (directory / name).rename(offline / name)
    assert signing.secureboot_enrolment(keys) == made
    # db rotated while PK and KEK are offline: the kept db.auth would enrol the old db, which
    # does not sign this build; nothing is shipped rather than that.
    (directory / "db.crt").unlink()
    (directory / "db.key").unlink()
    secureboot.init_secureboot_keys(keys)
    assert signing.secureboot_enrolment(keys) is None
    assert (directory / "db.auth").read_bytes() == made["db.auth"]  # left as it was
    # With PK and KEK back, the files are made again and list the new db.
    for name in ("PK.key", "KEK.key"):
        (offline / name).rename(directory / name)
    again = signing.secureboot_enrolment(keys)
    assert again is not None and again["db.auth"] != made["db.auth"]
    new_db = secureboot.load_certificate(directory / "db.crt")
    owner = secureboot.read_guid(keys)
    assert again["db.auth"].endswith(signing.signature_list(new_db, owner))
    assert (directory / "db.auth").read_bytes() == again["db.auth"]
    # The files depend on the keys alone: made again, the same bytes.
    for name in again:
        (directory / name).unlink()
    assert signing.secureboot_enrolment(keys) == again


def test_the_esp_carries_the_key_lists_where_systemd_boot_enrols_them(tmp_path: Path) -> None:
    from builder import disk, image, signing

    keys = tmp_path / "keys"
    secureboot.init_secureboot_keys(keys)
    files = signing.secureboot_enrolment(keys)
    assert files is not None
    boot, uki = tmp_path / "boot.efi", tmp_path / "uki.efi"
    boot.write_bytes(b"boot")
    uki.write_bytes(b"uki")
    esp = tmp_path / "esp.vfat"
    disk.make_esp(boot, uki, "1.2.3", 64 << 20, esp, "seed", image.esp_enrolment(keys))
    env = {"MTOOLS_SKIP_CHECK": "1"}
    for name, data in files.items():
        out = tmp_path / f"read-{name}"
        run(["mcopy", "-i", esp, f"::loader/keys/auto/{name}", out], env=env)
        assert out.read_bytes() == data
    conf = tmp_path / "loader.conf"
    run(["mcopy", "-i", esp, "::loader/loader.conf", conf], env=env)
    assert "secure-boot-enroll if-safe" in conf.read_text().splitlines()
    # No key lists (PK or KEK offline and none kept): no keys directory at all.
    bare = tmp_path / "bare.vfat"
    disk.make_esp(boot, uki, "1.2.3", 64 << 20, bare, "seed", [])
    listing = run(["mdir", "-i", bare, "-b", "::loader"], env=env, quiet=True).stdout.decode()
    assert "keys" not in listing
