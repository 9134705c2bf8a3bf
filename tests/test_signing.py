"""builder.signing: PE images signed with the db key, reproducibly, as sbverify and the agent's
own check (updater.disk.authenticode) accept them."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.errors import BuildError
from builder.publish import secureboot
from builder.run import find_tool, run
from builder.signing import sign_file, sign_image
from updater.disk import authenticode
from updater.disk.authenticode import Database

SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")


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
