"""updater.disk.authenticode against the real tools: images signed by sbsign, databases written
by efitools' cert-to-efi-sig-list and hash-to-efi-sig-list, as firmware reads them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from builder.publish import secureboot
from builder.run import find_tool, run
from tests.support.secureboot import ATTRIBUTES, SYSTEMD_BOOT, sbsign, signature_lists
from updater.disk import authenticode
from updater.disk.authenticode import Database
from updater.errors import VerificationError


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keys = tmp_path_factory.mktemp("sbkeys") / "keys"
    secureboot.init_secureboot_keys(keys)
    return keys / "secureboot"


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keys = tmp_path_factory.mktemp("otherkeys") / "keys"
    secureboot.init_secureboot_keys(keys, owner="Someone Else")
    return keys / "secureboot"


def certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def signed(keys: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    out = tmp_path_factory.mktemp("signed") / "boot.efi"
    return sbsign(SYSTEMD_BOOT, keys / "db.key", keys / "db.crt", out)


def test_an_image_signed_by_db_passes(signed: bytes, keys: Path, tmp_path: Path) -> None:
    db = authenticode.parse_database(signature_lists(tmp_path, keys / "db.crt"), "db")
    signature = authenticode.check_image(signed, db, Database(), "the new UKI")
    assert signature.signer == certificate(keys / "db.crt")
    # sbsign and this compute the same Authenticode hash: the one it signed
    assert signature.digest == authenticode.image_digest(signed)


def test_an_unsigned_image_is_refused(keys: Path, tmp_path: Path) -> None:
    db = authenticode.parse_database(signature_lists(tmp_path, keys / "db.crt"), "db")
    with pytest.raises(VerificationError, match="it is not signed, and Secure Boot is enforced"):
        authenticode.check_image(SYSTEMD_BOOT.read_bytes(), db, Database(), "the new UKI")


def test_an_image_signed_with_another_key_is_refused_naming_that_key(
    other: Path, keys: Path, tmp_path: Path
) -> None:
    image = sbsign(SYSTEMD_BOOT, other / "db.key", other / "db.crt", tmp_path / "boot.efi")
    db = authenticode.parse_database(signature_lists(tmp_path, keys / "db.crt"), "db")
    with pytest.raises(VerificationError) as e:
        authenticode.check_image(image, db, Database(), "the new UKI")
    message = str(e.value)
    assert "signed by CN=Someone Else Secure Boot db (sha256 " in message
    assert "which chains to no db certificate" in message
    assert "this machine's db holds: CN=Berth Secure Boot db" in message


def test_an_image_changed_after_signing_is_refused(signed: bytes, keys: Path) -> None:
    tampered = bytearray(signed)
    tampered[0x400] ^= 0x01  # inside the first section
    db = Database((certificate(keys / "db.crt"),))
    with pytest.raises(VerificationError, match="that does not match the image"):
        authenticode.check_image(bytes(tampered), db, Database(), "the new UKI")


def test_a_signer_issued_by_a_db_certificate_passes(tmp_path: Path) -> None:
    # An enterprise db: the CA is enrolled, a code-signing certificate it issued signs.
    now = datetime.now(UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Example CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Example signer")]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .sign(ca_key, hashes.SHA256())
    )
    (tmp_path / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.crt").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.key").write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    image = sbsign(SYSTEMD_BOOT, tmp_path / "leaf.key", tmp_path / "leaf.crt", tmp_path / "b.efi")
    db = authenticode.parse_database(signature_lists(tmp_path, tmp_path / "ca.crt"), "db")
    assert authenticode.check_image(image, db, Database(), "the new UKI").signer == leaf


def test_dbx_revokes_by_image_hash_and_by_certificate(
    signed: bytes, keys: Path, tmp_path: Path
) -> None:
    db = Database((certificate(keys / "db.crt"),))
    # efitools computes the image's Authenticode hash itself: the same as this one
    (tmp_path / "boot.efi").write_bytes(signed)
    esl = tmp_path / "dbx.esl"
    run([find_tool("hash-to-efi-sig-list"), tmp_path / "boot.efi", esl])
    dbx = authenticode.parse_database(ATTRIBUTES + esl.read_bytes(), "dbx")
    assert dbx.hashes == {authenticode.image_digest(signed)}
    with pytest.raises(VerificationError, match="is in dbx"):
        authenticode.check_image(signed, db, dbx, "the new UKI")
    dbx = authenticode.parse_database(signature_lists(tmp_path, keys / "db.crt"), "dbx")
    with pytest.raises(VerificationError, match="revoked in dbx by CN=Berth Secure Boot db"):
        authenticode.check_image(signed, db, dbx, "the new UKI")


def test_databases_are_read_from_efivarfs(keys: Path, tmp_path: Path) -> None:
    efivars = tmp_path / "efivars"
    efivars.mkdir()
    assert authenticode.read_database(efivars, "db") == Database()  # absent: empty
    path = efivars / f"db-{authenticode.SECURITY_GUID}"
    path.write_bytes(signature_lists(tmp_path, keys / "db.crt", keys / "KEK.crt"))
    db = authenticode.read_database(efivars, "db")
    assert db.certificates == (certificate(keys / "db.crt"), certificate(keys / "KEK.crt"))
    path.write_bytes(ATTRIBUTES + b"\x00" * 20)
    with pytest.raises(VerificationError, match=f"cannot read {path}"):
        authenticode.read_database(efivars, "db")


@pytest.mark.parametrize(
    "image",
    [b"", b"MZ" + b"\0" * 100, b"not a PE file at all" * 10],
)
def test_what_is_not_a_pe_image_is_a_clear_refusal(image: bytes) -> None:
    with pytest.raises(VerificationError, match="not a signable PE image"):
        authenticode.check_image(image, Database(), Database(), "the new UKI")
