"""Secure Boot keys (builder.publish.secureboot and `keys init|show`), checked with openssl."""

from __future__ import annotations

import stat
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from builder.errors import PublishError
from builder.publish import secureboot
from builder.run import run
from cli.main import main

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def openssl(*args: str | Path) -> str:
    return run(["openssl", *args], capture=True).stdout.decode()


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keys = tmp_path_factory.mktemp("sb") / "keys"
    secureboot.init_secureboot_keys(keys, now=NOW)
    return keys


def test_pk_kek_db_are_rsa2048_certificates_with_private_keys_only_the_owner_reads(
    made: Path,
) -> None:
    directory = made / "secureboot"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert sorted(p.name for p in directory.iterdir()) == [
        "GUID",
        "KEK.crt",
        "KEK.key",
        "PK.crt",
        "PK.key",
        "db.crt",
        "db.key",
    ]
    for name in secureboot.NAMES:
        assert stat.S_IMODE((directory / f"{name}.key").stat().st_mode) == 0o600
        assert stat.S_IMODE((directory / f"{name}.crt").stat().st_mode) == 0o644
        text = openssl("x509", "-in", directory / f"{name}.crt", "-noout", "-text")
        assert f"Subject: CN = Berth Secure Boot {name}" in text
        assert "Public-Key: (2048 bit)" in text
        assert "sha256WithRSAEncryption" in text
        # the private key is the certificate's
        key_modulus = openssl("rsa", "-in", directory / f"{name}.key", "-noout", "-modulus")
        cert_modulus = openssl("x509", "-in", directory / f"{name}.crt", "-noout", "-modulus")
        assert key_modulus == cert_modulus
    db = openssl("x509", "-in", directory / "db.crt", "-noout", "-text")
    assert "Code Signing" in db
    assert "CA:FALSE" in db
    uuid.UUID((directory / "GUID").read_text().strip())


def test_show_lists_fingerprints_and_expiry_as_openssl_reads_them(made: Path) -> None:
    described = {k.name: k for k in secureboot.describe_secureboot_keys(made)}
    assert list(described) == ["PK", "KEK", "db"]
    for name, key in described.items():
        out = openssl(
            "x509", "-in", made / f"secureboot/{name}.crt", "-noout", "-fingerprint", "-sha256"
        )
        assert out.split("=", 1)[1].strip().replace(":", "").lower() == key.fingerprint
        assert key.not_after == NOW + secureboot.LIFETIME[name]
        assert key.private_key == made / f"secureboot/{name}.key"
    assert described["db"].not_after - NOW == timedelta(days=5 * 365)


def test_keys_are_never_overwritten(made: Path) -> None:
    before = snapshot(made / "secureboot")
    with pytest.raises(PublishError, match="already holds Secure Boot keys"):
        secureboot.init_secureboot_keys(made)
    assert snapshot(made / "secureboot") == before


def test_offline_private_keys_are_shown_as_offline(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    secureboot.init_secureboot_keys(keys, now=NOW)
    (keys / "secureboot/PK.key").unlink()
    (keys / "secureboot/KEK.key").unlink()
    described = {k.name: k for k in secureboot.describe_secureboot_keys(keys)}
    assert described["PK"].private_key is None
    assert "private key offline" in described["KEK"].describe()
    assert described["db"].private_key is not None


def test_a_private_key_others_can_read_is_refused_with_the_fix(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    secureboot.init_secureboot_keys(keys, now=NOW)
    (keys / "secureboot/db.key").chmod(0o644)
    with pytest.raises(
        PublishError, match=r"db\.key has mode 0644: group and others can read"
    ) as e:
        secureboot.describe_secureboot_keys(keys)
    assert "chmod 600" in (e.value.hint or "")


def test_a_malformed_certificate_names_the_file_and_what_was_expected(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    secureboot.init_secureboot_keys(keys, now=NOW)
    (keys / "secureboot/KEK.crt").write_text("not a certificate\n")
    with pytest.raises(PublishError, match=r"KEK\.crt: expected a PEM X\.509 certificate"):
        secureboot.describe_secureboot_keys(keys)


def test_keys_init_adds_secure_boot_keys_to_a_directory_with_tuf_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    assert main(["keys", "init", "--keys", str(keys)]) == 0
    tuf_before = {p.name: p.read_bytes() for p in keys.glob("*.pem")}
    # An older keys directory: TUF keys only.
    for path in (keys / "secureboot").iterdir():
        path.unlink()
    (keys / "secureboot").rmdir()
    assert main(["keys", "init", "--keys", str(keys)]) == 0
    assert {p.name: p.read_bytes() for p in keys.glob("*.pem")} == tuf_before
    assert (keys / "secureboot/db.crt").exists()
    capsys.readouterr()
    assert main(["keys", "show", "--keys", str(keys)]) == 0
    out = capsys.readouterr().out
    assert "secure boot PK   CN=Berth Secure Boot PK, sha256 " in out
    assert "secure boot db   CN=Berth Secure Boot db" in out
    # Both sets there: refused, nothing changed.
    before = snapshot(keys / "secureboot")
    assert main(["keys", "init", "--keys", str(keys)]) == 1
    assert "already holds TUF, Secure Boot and PCR keys" in capsys.readouterr().err
    assert snapshot(keys / "secureboot") == before
    # Root key options only apply when the TUF keys are made.
    for path in (keys / "secureboot").iterdir():
        path.unlink()
    assert main(["keys", "init", "--keys", str(keys), "--root-keys", "3"]) == 1
    assert "apply only when they are made" in capsys.readouterr().err
    assert not any((keys / "secureboot").iterdir())


def test_an_enterprise_db_key_brought_in_is_kept(tmp_path: Path) -> None:
    # The operator's own db certificate and key (from their PKI), placed before `keys init`:
    # PK and KEK are made around it, the db files stay byte for byte.
    elsewhere = tmp_path / "pki"
    secureboot.init_secureboot_keys(elsewhere, owner="Example Corp", now=NOW)
    keys = tmp_path / "keys"
    (keys / "secureboot").mkdir(parents=True, mode=0o700)
    keys.chmod(0o700)
    for suffix, mode in ((".crt", 0o644), (".key", 0o600)):
        target = keys / "secureboot" / f"db{suffix}"
        target.write_bytes((elsewhere / "secureboot" / f"db{suffix}").read_bytes())
        target.chmod(mode)
    brought = snapshot(keys / "secureboot")
    assert secureboot.init_secureboot_keys(keys, now=NOW) == ["PK", "KEK"]
    now = snapshot(keys / "secureboot")
    assert now["db.crt"] == brought["db.crt"] and now["db.key"] == brought["db.key"]
    described = {k.name: k.subject for k in secureboot.describe_secureboot_keys(keys)}
    assert described == {
        "PK": "CN=Berth Secure Boot PK",
        "KEK": "CN=Berth Secure Boot KEK",
        "db": "CN=Example Corp Secure Boot db",
    }


def test_a_key_brought_in_without_its_certificate_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    (keys / "secureboot").mkdir(parents=True, mode=0o700)
    (keys / "secureboot/db.key").write_text("a key\n")
    with pytest.raises(PublishError, match=r"db\.key without db\.crt"):
        secureboot.init_secureboot_keys(keys)
    assert sorted(p.name for p in (keys / "secureboot").iterdir()) == ["db.key"]


def test_keys_init_writes_the_enrolment_files_while_pk_and_kek_are_here(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from builder import signing

    keys = tmp_path / "keys"
    assert main(["keys", "init", "--keys", str(keys)]) == 0
    assert "Wrote the enrolment files PK.auth, KEK.auth and db.auth" in capsys.readouterr().err
    directory = keys / "secureboot"
    written = {name: (directory / name).read_bytes() for name in ("PK.auth", "KEK.auth", "db.auth")}
    # What a build finds later, with PK and KEK gone offline, is exactly these.
    (directory / "PK.key").unlink()
    (directory / "KEK.key").unlink()
    assert signing.secureboot_enrolment(keys) == written
    capsys.readouterr()
    assert main(["keys", "show", "--keys", str(keys)]) == 0
    assert "enrolment   PK.auth, KEK.auth, db.auth: current" in capsys.readouterr().out
    (directory / "db.auth").unlink()
    assert main(["keys", "show", "--keys", str(keys)]) == 0
    assert "PK.key or KEK.key is offline: builds carry no keys" in capsys.readouterr().out
