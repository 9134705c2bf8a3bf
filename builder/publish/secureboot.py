"""Secure Boot keys: the platform key (PK), the key exchange key (KEK) and the signature
database key (db), each an X.509 certificate with its private key, in `<keys>/secureboot/`.

Why three: UEFI lets the holder of PK replace KEK, the holders of KEK change db and dbx, and the
firmware starts only what a db certificate signed. Only db signs, at every build (systemd-boot
and each UKI); PK and KEK sign the key lists a machine enrols and any later change of them, so
their private keys can live offline, like the TUF root key (docs/updates.md).

RSA 2048 with SHA-256, self-signed certificates: what every UEFI implementation verifies (EDK2
and OVMF, the vendors' firmware, the clouds' custom signature databases); larger RSA or ECDSA
keys are refused by some firmware. `GUID` is the owner GUID the EFI signature lists carry.

Files are written once, never overwritten: `*.key` 0600, certificates and `GUID` 0644, the
directory 0700.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from builder.errors import PublishError
from builder.publish.keys import (
    DIR_MODE,
    PRIVATE_MODE,
    PUBLIC_MODE,
    _mode_problem,
    _owner_problem,
    _private_key_problems,
    _refuse,
    _write_new,
)

NAMES = ("PK", "KEK", "db")
# PK and KEK sign only enrolments and key changes, from offline storage, for the life of the
# hardware; db signs every build and is the one to rotate (docs/updates.md).
LIFETIME = {
    "PK": timedelta(days=20 * 365),
    "KEK": timedelta(days=20 * 365),
    "db": timedelta(days=5 * 365),
}
_ROLE = {"PK": "platform key", "KEK": "key exchange key", "db": "signature database key"}
RSA_BITS = 2048
GUID_FILE = "GUID"


def secureboot_dir(keys_dir: Path) -> Path:
    return keys_dir / "secureboot"


def has_secureboot_keys(keys_dir: Path) -> bool:
    """Whether all three certificates are there (a private key may be offline)."""
    directory = secureboot_dir(keys_dir)
    return all((directory / f"{name}.crt").exists() for name in NAMES)


@dataclass(frozen=True)
class SecureBootKey:
    """One of PK, KEK and db as `keys show` lists it."""

    name: str
    subject: str
    fingerprint: str  # sha256 of the DER certificate, as firmware setup screens and sbctl show it
    not_after: datetime
    private_key: Path | None  # None: not in the directory (kept offline)

    def describe(self) -> str:
        where = "private key here" if self.private_key else "private key offline"
        return (
            f"{self.subject}, sha256 {self.fingerprint}, expires {self.not_after:%Y-%m-%d}, {where}"
        )


def init_secureboot_keys(
    keys_dir: Path, *, owner: str = "Berth", now: datetime | None = None
) -> list[str]:
    """Make whichever of PK, KEK and db `<keys_dir>/secureboot/` has no certificate for (one
    put there beforehand, an enterprise db key say, is kept and checked); the names made.
    Refused when all three are there: keys are never overwritten."""
    directory = secureboot_dir(keys_dir)
    if has_secureboot_keys(keys_dir):
        raise PublishError(
            f"{directory} already holds Secure Boot keys (PK.crt, KEK.crt, db.crt)",
            hint="keys are never overwritten; choose another keys directory, or rotate db "
            "as docs/updates.md describes",
        )
    if not owner.strip() or len(owner) > 48:
        raise PublishError(f"Secure Boot key owner {owner!r}: expected 1 to 48 characters")
    missing = [name for name in NAMES if not (directory / f"{name}.crt").exists()]
    for name in NAMES:
        if name not in missing:
            load_certificate(directory / f"{name}.crt")  # a file brought in must be one
        elif (directory / f"{name}.key").exists():
            raise PublishError(
                f"{directory} has {name}.key without {name}.crt",
                hint=f"put the certificate of that key at {directory / f'{name}.crt'}, or move "
                "the key away to have a new pair made",
            )
    keys_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    directory.mkdir(mode=DIR_MODE, exist_ok=True)
    directory.chmod(DIR_MODE)
    when = (now or datetime.now(UTC)).replace(microsecond=0)
    for name in missing:
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        certificate = _certificate(key, f"{owner} Secure Boot {name}", name, when)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_new(directory / f"{name}.key", pem, PRIVATE_MODE)
        _write_new(
            directory / f"{name}.crt",
            certificate.public_bytes(serialization.Encoding.PEM),
            PUBLIC_MODE,
        )
    if not (directory / GUID_FILE).exists():
        _write_new(directory / GUID_FILE, f"{uuid.uuid4()}\n".encode(), PUBLIC_MODE)
    describe_secureboot_keys(keys_dir)  # what was brought in must be private, as what was made
    return missing


def _certificate(
    key: rsa.RSAPrivateKey, common_name: str, name: str, when: datetime
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # A day back: a machine whose clock runs behind still sees the certificate as valid.
        .not_valid_before(when - timedelta(days=1))
        .not_valid_after(when + LIFETIME[name])
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if name == "db":
        # What signs code: sbverify and the firmware look for a code-signing certificate.
        builder = builder.add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
    else:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
    return builder.sign(key, hashes.SHA256())


def load_certificate(path: Path) -> x509.Certificate:
    """A PEM certificate, or PublishError naming the file and what was expected."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PublishError(f"cannot read the Secure Boot certificate {path}: {e}") from e
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise PublishError(
            f"{path}: expected a PEM X.509 certificate (-----BEGIN CERTIFICATE-----): {e}"
        ) from e


def fingerprint(certificate: x509.Certificate) -> str:
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def describe_secureboot_keys(keys_dir: Path) -> list[SecureBootKey]:
    """PK, KEK and db as `keys show` lists them (empty without Secure Boot keys); a private key
    another user could read, or a file another user owns, is refused with the fix."""
    directory = secureboot_dir(keys_dir)
    if not directory.is_dir():
        return []
    st = directory.stat()
    problems = [
        _mode_problem(directory, st, str(directory), 0o077, f"{DIR_MODE:o}"),
        _owner_problem(directory, st, str(directory)),
    ]
    found = []
    for name in NAMES:
        private, found_problems = _private_key_problems(directory / f"{name}.key")
        problems += found_problems
        certificate_path = directory / f"{name}.crt"
        if not certificate_path.exists():
            raise PublishError(
                f"{directory} has no {name}.crt (the {_ROLE[name]}'s certificate)",
                hint="copy it back from where the keys were made; a certificate is public",
            )
        certificate = load_certificate(certificate_path)
        found.append(
            SecureBootKey(
                name,
                certificate.subject.rfc4514_string(),
                fingerprint(certificate),
                certificate.not_valid_after_utc,
                private,
            )
        )
    _refuse(directory, problems)
    return found


def read_guid(keys_dir: Path) -> uuid.UUID:
    """The owner GUID of the EFI signature lists made from these keys."""
    path = secureboot_dir(keys_dir) / GUID_FILE
    try:
        text = path.read_text().strip()
        return uuid.UUID(text)
    except (OSError, ValueError) as e:
        raise PublishError(f"{path}: expected an owner GUID such as {uuid.UUID(int=0)}: {e}") from e
