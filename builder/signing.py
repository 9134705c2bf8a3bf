"""Authenticode signing of PE images (systemd-boot, UKIs) with the Secure Boot db key.

The same inputs give the same signed file. sbsign cannot promise that: OpenSSL's PKCS#7 signer
adds the signing time, so two builds a second apart differ in their signature (and in the PE
checksum over it). This signer writes exactly what firmware reads and nothing that changes with
the clock: a PKCS#7 SignedData over Authenticode's SpcIndirectDataContent (the image's sha256,
as updater/disk/authenticode.py computes it, the module the agent checks with), with the
contentType and messageDigest attributes, signed with RSA PKCS#1 v1.5 and SHA-256 (which is
deterministic); the db certificate is included. The certificate table is appended 8-byte
aligned, the directory entry set, and the PE checksum recomputed. sbverify accepts the result
(tests/test_signing.py).
"""

from __future__ import annotations

import hashlib
import struct
import sys
import uuid
from array import array
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from builder.errors import BuildError
from builder.publish import secureboot
from updater.disk import authenticode, firmware
from updater.errors import VerificationError
from updater.files import atomic_writer

_RSA = "1.2.840.113549.1.1.1"
_PE_IMAGE_DATA = "1.3.6.1.4.1.311.2.1.15"
_CONTENT_TYPE = "1.2.840.113549.1.9.3"


def _der(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + value


def _seq(*parts: bytes) -> bytes:
    return _der(0x30, b"".join(parts))


def _set(*parts: bytes) -> bytes:
    return _der(0x31, b"".join(sorted(parts)))  # DER: a SET OF in sorted order


def _oid(dotted: str) -> bytes:
    numbers = [int(p) for p in dotted.split(".")]
    out = bytearray([numbers[0] * 40 + numbers[1]])
    for n in numbers[2:]:
        chunk = [n & 0x7F]
        n >>= 7
        while n:
            chunk.append(0x80 | (n & 0x7F))
            n >>= 7
        out += bytes(reversed(chunk))
    return _der(0x06, bytes(out))


def _integer(n: int) -> bytes:
    return _der(0x02, n.to_bytes(n.bit_length() // 8 + 1, "big", signed=False))


_NULL = b"\x05\x00"


def _indirect_data(digest: bytes) -> bytes:
    # SpcPeImageData: flags (an empty BIT STRING) and an SpcLink of an empty file name, as
    # signtool and sbsign write it: "<<<Obsolete>>>" in UTF-16.
    obsolete = "<<<Obsolete>>>".encode("utf-16-be")
    pe_image_data = _seq(_der(0x03, b"\x00"), _der(0xA0, _der(0xA2, _der(0x80, obsolete))))
    return _seq(
        _seq(_oid(_PE_IMAGE_DATA), pe_image_data),
        _seq(_seq(_oid(authenticode.OID_SHA256), _NULL), _der(0x04, digest)),
    )


def _signer_info(certificate: x509.Certificate, signature: bytes, attributes: bytes = b"") -> bytes:
    """A SignerInfo: the signer by issuer and serial, SHA-256, the signed attributes (if any),
    RSA, the signature."""
    return _seq(
        _integer(1),
        _seq(certificate.issuer.public_bytes(), _integer(certificate.serial_number)),
        _seq(_oid(authenticode.OID_SHA256), _NULL),
        attributes,
        _seq(_oid(_RSA), _NULL),
        _der(0x04, signature),
    )


def authenticode_signature(
    digest: bytes, key: rsa.RSAPrivateKey, certificate: x509.Certificate
) -> bytes:
    """The DER PKCS#7 ContentInfo signing an image whose Authenticode sha256 is `digest`."""
    indirect = _indirect_data(digest)
    content_value = authenticode.der_contents(indirect)  # hashed without its tag and length
    attributes = [
        _seq(_oid(_CONTENT_TYPE), _set(_oid(authenticode.OID_INDIRECT_DATA))),
        _seq(
            _oid(authenticode.OID_MESSAGE_DIGEST),
            _set(_der(0x04, hashlib.sha256(content_value).digest())),
        ),
    ]
    signed_attributes = _set(*attributes)
    signature = key.sign(signed_attributes, padding.PKCS1v15(), hashes.SHA256())
    # The attributes as [0] IMPLICIT SET OF; what was signed is them as a SET.
    signer_info = _signer_info(certificate, signature, b"\xa0" + signed_attributes[1:])
    signed_data = _seq(
        _integer(1),
        _set(_seq(_oid(authenticode.OID_SHA256), _NULL)),
        _seq(_oid(authenticode.OID_INDIRECT_DATA), _der(0xA0, indirect)),
        _der(0xA0, certificate.public_bytes(serialization.Encoding.DER)),
        _set(signer_info),
    )
    return _seq(_oid(authenticode.OID_SIGNED_DATA), _der(0xA0, signed_data))


def _pe_checksum(image: bytearray, checksum_at: int) -> int:
    """The PE checksum: the 16-bit sum of the file's words with the carries folded back in,
    plus the file's length (the checksum field must be zero when this runs)."""
    if struct.unpack_from("<I", image, checksum_at)[0]:
        raise ValueError("the checksum field must be zeroed first")
    padded = bytes(image) + b"\0" * (len(image) % 2)
    words = array("H", padded)  # little-endian, as PE files and x86 are
    if sys.byteorder != "little":
        words.byteswap()
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (total + len(image)) & 0xFFFFFFFF


def sign_image(image: bytes, key_path: Path, cert_path: Path, what: str) -> bytes:
    """`image` signed with the db key: any signature it had is replaced."""
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError, TypeError) as e:
        raise BuildError(
            f"cannot load the Secure Boot db key ({key_path}, {cert_path}): {e}"
        ) from e
    if not isinstance(key, rsa.RSAPrivateKey):
        raise BuildError(f"{key_path}: expected an RSA private key (firmware verifies RSA)")
    try:
        offsets = authenticode.offsets(image)
    except VerificationError as e:
        raise BuildError(f"cannot sign {what}: {e}") from e
    data = bytearray(image[: offsets.table_at] if offsets.table_size else image)
    struct.pack_into("<II", data, offsets.cert_entry, 0, 0)
    data += b"\0" * (-len(data) % 8)  # the table starts 8-byte aligned, the padding hashed
    signature = authenticode_signature(authenticode.image_digest(bytes(data)), key, certificate)
    entry = struct.pack("<IHH", 8 + len(signature), 0x0200, 0x0002) + signature
    entry += b"\0" * (-len(entry) % 8)
    table_at = len(data)
    data += entry
    struct.pack_into("<II", data, offsets.cert_entry, table_at, len(entry))
    struct.pack_into("<I", data, offsets.checksum, 0)
    struct.pack_into("<I", data, offsets.checksum, _pe_checksum(data, offsets.checksum))
    return bytes(data)


def sign_file(path: Path, key_path: Path, cert_path: Path) -> None:
    """Sign the PE file at `path` in place (through a temporary file and a rename)."""
    signed = sign_image(path.read_bytes(), key_path, cert_path, str(path))
    temp = path.with_name(path.name + ".signing")
    temp.write_bytes(signed)
    temp.replace(path)


# --- enrolment: the signed key lists a machine in setup mode takes ----------------------------

_DATA = "1.2.840.113549.1.7.1"
_PKCS7_GUID = uuid.UUID("4aafd29d-68df-49ee-8aa9-347d375665a7")  # EFI_CERT_TYPE_PKCS7_GUID
_GLOBAL = uuid.UUID(firmware.GLOBAL_GUID)
_SECURITY = uuid.UUID(authenticode.SECURITY_GUID)
# Non-volatile, boot and runtime access, time-based authenticated writes: what PK, KEK and db are.
AUTH_ATTRIBUTES = 0x27
# Which key signs which list, and the variable's vendor GUID (UEFI 2.x, 8.2: PK and KEK are
# global variables, db is the image security database's).
ENROLMENT = {"PK": ("PK", _GLOBAL), "KEK": ("PK", _GLOBAL), "db": ("KEK", _SECURITY)}


def signature_list(certificate: x509.Certificate, owner: uuid.UUID) -> bytes:
    """An EFI_SIGNATURE_LIST of one X.509 certificate, as efitools' cert-to-efi-sig-list makes."""
    der = certificate.public_bytes(serialization.Encoding.DER)
    size = 16 + len(der)
    header = authenticode.CERT_X509.bytes_le + struct.pack("<III", 28 + size, 0, size)
    return header + owner.bytes_le + der


def _efi_time(when: datetime) -> bytes:
    when = when.astimezone(UTC)
    return struct.pack(
        "<HBBBBBBIhBB",
        when.year,
        when.month,
        when.day,
        when.hour,
        when.minute,
        when.second,
        0,
        0,
        0,
        0,
        0,
    )


def detached_signed_data(
    content: bytes, key: rsa.RSAPrivateKey, certificate: x509.Certificate
) -> bytes:
    """A bare PKCS#7 SignedData (no ContentInfo around it, as UEFI wants it in an authenticated
    variable) signing `content` detached, without signed attributes: deterministic."""
    signature = key.sign(content, padding.PKCS1v15(), hashes.SHA256())
    signer_info = _signer_info(certificate, signature)
    return _seq(
        _integer(1),
        _set(_seq(_oid(authenticode.OID_SHA256), _NULL)),
        _seq(_oid(_DATA)),
        _der(0xA0, certificate.public_bytes(serialization.Encoding.DER)),
        _set(signer_info),
    )


def auth_file(
    name: str,
    data: bytes,
    key: rsa.RSAPrivateKey,
    certificate: x509.Certificate,
    when: datetime,
) -> bytes:
    """`name`'s EFI_VARIABLE_AUTHENTICATION_2 payload (what systemd-boot's enrolment and
    efi-updatevar write): the time, a PKCS#7 signature over name, vendor GUID, attributes,
    time and data, then the data."""
    vendor = ENROLMENT[name][1]
    stamp = _efi_time(when)
    signed = name.encode("utf-16-le") + vendor.bytes_le + struct.pack("<I", AUTH_ATTRIBUTES)
    signed += stamp + data
    pkcs7 = detached_signed_data(signed, key, certificate)
    header = struct.pack("<IHH", 8 + 16 + len(pkcs7), 0x0200, 0x0EF1) + _PKCS7_GUID.bytes_le
    return stamp + header + pkcs7 + data


def enrolment_files(keys_dir: Path, when: datetime) -> dict[str, bytes]:
    """PK.auth, KEK.auth and db.auth for `keys_dir`'s Secure Boot keys: PK and KEK signed by
    PK, db by KEK (so PK.key and KEK.key must be here to make them)."""
    directory = secureboot.secureboot_dir(keys_dir)
    owner = secureboot.read_guid(keys_dir)
    out = {}
    for name, (signer, _vendor) in ENROLMENT.items():
        certificate = secureboot.load_certificate(directory / f"{name}.crt")
        key_path = directory / f"{signer}.key"
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except FileNotFoundError:
            raise BuildError(
                f"no {key_path}: {name}.auth is signed with the {signer} key",
                hint=f"bring {signer}.key back from offline storage to make the enrolment files",
            ) from None
        except (OSError, ValueError) as e:
            raise BuildError(f"cannot load {key_path}: {e}") from e
        if not isinstance(key, rsa.RSAPrivateKey):
            raise BuildError(f"{key_path}: expected an RSA private key (firmware verifies RSA)")
        signer_cert = secureboot.load_certificate(directory / f"{signer}.crt")
        out[f"{name}.auth"] = auth_file(
            name, signature_list(certificate, owner), key, signer_cert, when
        )
    return out


def _enrolment_time(directory: Path) -> datetime:
    """The time stamp the enrolment files carry: the newest of the three certificates' start,
    so that the files depend on the keys alone (reproducible) and a rotated db's are newer."""
    starts = [
        secureboot.load_certificate(directory / f"{name}.crt").not_valid_before_utc
        for name in ENROLMENT
    ]
    return max(starts)


def _lists_current(files: dict[str, bytes], directory: Path, owner: uuid.UUID) -> bool:
    """Whether each kept .auth file enrols exactly today's certificate (its data is the end)."""
    for name in ENROLMENT:
        certificate = secureboot.load_certificate(directory / f"{name}.crt")
        if not files[f"{name}.auth"].endswith(signature_list(certificate, owner)):
            return False
    return True


def _kept_enrolment(keys_dir: Path) -> dict[str, bytes] | None:
    """The enrolment files kept in `keys/secureboot/` when all are there and current."""
    directory = secureboot.secureboot_dir(keys_dir)
    try:
        kept = {f"{n}.auth": (directory / f"{n}.auth").read_bytes() for n in ENROLMENT}
    except FileNotFoundError:
        return None
    except OSError as e:
        raise BuildError(f"cannot read the enrolment files in {directory}: {e}") from e
    return kept if _lists_current(kept, directory, secureboot.read_guid(keys_dir)) else None


def _signers_online(keys_dir: Path) -> bool:
    """Whether PK.key and KEK.key, which sign the enrolment files, are in the keys directory."""
    directory = secureboot.secureboot_dir(keys_dir)
    return all((directory / f"{signer}.key").exists() for signer, _ in ENROLMENT.values())


def describe_enrolment(keys_dir: Path) -> str:
    """What `keys show` says of the enrolment files: current, or why a build cannot ship them."""
    if _kept_enrolment(keys_dir) is not None:
        return "PK.auth, KEK.auth, db.auth: current (every build puts them on the ESP)"
    if _signers_online(keys_dir):
        return "PK.auth, KEK.auth, db.auth: missing or stale; the next build makes them again"
    return (
        "PK.auth, KEK.auth, db.auth: missing or stale, and PK.key or KEK.key is offline: "
        "builds carry no keys to enrol until they are back once"
    )


def secureboot_enrolment(keys_dir: Path) -> dict[str, bytes] | None:
    """PK.auth, KEK.auth and db.auth for the ESP's `loader/keys/auto/`.

    They are kept beside the keys (`keys/secureboot/*.auth`, public) so that PK.key and KEK.key
    can go offline once they are made: `keys init` makes them while both are still here. Files
    that no longer list today's certificates (db rotated) are made again when PK and KEK are
    here; when they are not, None: shipping them would enrol a db that does not sign this
    build, and a machine enrolled from them would refuse to boot it.
    """
    directory = secureboot.secureboot_dir(keys_dir)
    paths = {f"{name}.auth": directory / f"{name}.auth" for name in ENROLMENT}
    kept = _kept_enrolment(keys_dir)
    if kept is not None:
        return kept
    if not _signers_online(keys_dir):
        return None
    made = enrolment_files(keys_dir, _enrolment_time(directory))
    for name, data in made.items():
        with atomic_writer(paths[name], mode=0o644) as f:
            f.write(data)
    return made
