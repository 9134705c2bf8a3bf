"""The PCR signing key: signs each UKI's predicted PCR 11 values, in `<keys>/tpm2/`.

A machine seals STATE's key to "PCR 11 as signed by this public key" rather than to one PCR 11
value, so every release the build signs with the same key unlocks STATE on its first boot and
nothing else does (systemd-measure(1), systemd-cryptenroll(1) `--tpm2-public-key`). It is kept
apart from the Secure Boot keys: db decides what the firmware starts, this key decides which of
those releases may read STATE; either can be rotated without the other (docs/security.md).

RSA 2048: what the TPM's TPM2_VerifySignature accepts on every TPM 2.0 (ECC P-256 is not
required of them). `pcr-private.pem` 0600 (PKCS#8), `pcr-public.pem` 0644 (SubjectPublicKeyInfo,
the form systemd-stub puts in the initrd as /.extra/tpm2-pcr-public-key.pem); the directory 0700.
Written once, never overwritten.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

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

PRIVATE = "pcr-private.pem"
PUBLIC = "pcr-public.pem"
RSA_BITS = 2048


def pcr_dir(keys_dir: Path) -> Path:
    return keys_dir / "tpm2"


def has_pcr_key(keys_dir: Path) -> bool:
    return (pcr_dir(keys_dir) / PUBLIC).exists()


@dataclass(frozen=True)
class PcrKey:
    public: Path
    private: Path | None  # None: offline (builds cannot sign PCR predictions)
    fingerprint: str  # sha256 of the DER public key, as `keys show` prints it

    def describe(self) -> str:
        where = "private key here" if self.private is not None else "PRIVATE KEY OFFLINE"
        return f"RSA {RSA_BITS} sha256:{self.fingerprint[:16]} ({where})"


def init_pcr_key(keys_dir: Path) -> bool:
    """Make the PCR key pair unless the directory has one; True when it was made."""
    directory = pcr_dir(keys_dir)
    if has_pcr_key(keys_dir):
        return False
    if (directory / PRIVATE).exists():
        raise PublishError(
            f"{directory} has {PRIVATE} without {PUBLIC}",
            hint=f"write its public key there (openssl pkey -in {PRIVATE} -pubout), or move the "
            "private key away to have a new pair made",
        )
    keys_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    directory.mkdir(mode=DIR_MODE, exist_ok=True)
    directory.chmod(DIR_MODE)
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(directory / PRIVATE, private, PRIVATE_MODE)
    _write_new(directory / PUBLIC, public, PUBLIC_MODE)
    return True


def describe_pcr_key(keys_dir: Path) -> PcrKey | None:
    """The PCR key as `keys show` lists it (None when there is none); a private key another
    user could read, or a file another user owns, is refused with the fix."""
    directory = pcr_dir(keys_dir)
    public = directory / PUBLIC
    if not public.exists():
        return None
    st = directory.stat()
    problems = [
        _mode_problem(directory, st, str(directory), 0o077, f"{DIR_MODE:o}"),
        _owner_problem(directory, st, str(directory)),
    ]
    private, found_problems = _private_key_problems(directory / PRIVATE)
    problems += found_problems
    _refuse(directory, problems)
    try:
        loaded = serialization.load_pem_public_key(public.read_bytes())
    except (OSError, ValueError) as error:
        raise PublishError(f"{public}: expected a PEM public key: {error}") from None
    if not isinstance(loaded, rsa.RSAPublicKey):
        raise PublishError(f"{public}: expected an RSA public key, got {type(loaded).__name__}")
    der = loaded.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if private is not None:
        try:
            secret = serialization.load_pem_private_key(private.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as error:
            raise PublishError(
                f"{private}: expected an unencrypted PEM private key: {error}"
            ) from None
        mine = secret.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if mine != der:
            raise PublishError(
                f"{private} does not belong to {public}",
                hint="put the matching pair back; a UKI signed with one and carrying the other "
                "would never unlock STATE",
            )
    return PcrKey(public, private, hashlib.sha256(der).hexdigest())
