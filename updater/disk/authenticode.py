"""Whether the firmware would start a PE image (a UKI, systemd-boot): its Authenticode signature
checked against the machine's Secure Boot databases, as UEFI firmware checks it.

A PE image carries its signatures in the certificate table its optional header points to: one or
more WIN_CERTIFICATE entries (8-byte aligned), each a PKCS#7 SignedData whose content is an
Authenticode SpcIndirectDataContent holding the sha256 of the image (computed over the file
without its checksum field, the certificate table's directory entry and the table itself). The
firmware (EDK2's DxeImageVerificationLib) starts the image when one signature verifies and chains
to a certificate in db, and neither the image's hash nor a certificate of the chain is in dbx.
Certificate expiry is not checked: firmware has no trusted clock, and neither does this.

db and dbx are read from efivarfs: 4 bytes of attributes, then EFI_SIGNATURE_LISTs, each a
signature type GUID, sizes, and entries of an owner GUID and the data (an X.509 certificate in
DER, or a sha256).

Runs on the device: the standard library and python3-cryptography (which python-tuf's key
handling already brings).
"""

from __future__ import annotations

import hashlib
import mmap
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from updater.errors import VerificationError

SECURITY_GUID = "d719b2cb-3d3a-4596-a3bc-dad00e67656f"  # EFI_IMAGE_SECURITY_DATABASE_GUID
CERT_X509 = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
CERT_SHA256 = uuid.UUID("c1c41626-504c-4092-aca9-41f936934328")

_WIN_CERT_PKCS7 = 0x0002
# The object identifiers a signature names (builder/signing.py writes them).
OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_INDIRECT_DATA = "1.3.6.1.4.1.311.2.1.4"  # Authenticode's SpcIndirectDataContent
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
OID_SHA256 = "2.16.840.1.101.3.4.2.1"
_MAX_CHAIN = 4

# A PE image in memory, or mapped from its file (a UKI is tens of MB: hashed where it lies).
Image = bytes | bytearray | memoryview | mmap.mmap


class _Malformed(Exception):
    pass


# --- DER, as much as a PKCS#7 signature needs -------------------------------------------------


@dataclass(frozen=True)
class _Node:
    tag: int
    data: bytes  # the whole encoding: tag, length and value
    start: int  # where the value starts in `data`

    @property
    def value(self) -> bytes:
        return self.data[self.start :]

    def children(self) -> list[_Node]:
        out = []
        rest = self.value
        while rest:
            node, rest = _read(rest)
            out.append(node)
        return out


def _read(data: bytes) -> tuple[_Node, bytes]:
    """The first DER element of `data` and what follows it."""
    if len(data) < 2:
        raise _Malformed("a DER element is cut short")
    tag, first = data[0], data[1]
    if tag & 0x1F == 0x1F:
        raise _Malformed("a DER tag of more than one byte")
    if first < 0x80:
        length, head = first, 2
    else:
        count = first & 0x7F
        if not 1 <= count <= 4 or len(data) < 2 + count:
            raise _Malformed("a DER length of an unsupported size")
        length, head = int.from_bytes(data[2 : 2 + count], "big"), 2 + count
    end = head + length
    if end > len(data):
        raise _Malformed("a DER element longer than its container")
    return _Node(tag, data[:end], head), data[end:]


def _oid(node: _Node) -> str:
    if node.tag != 0x06 or not node.value:
        raise _Malformed("expected an OBJECT IDENTIFIER")
    raw = node.value
    parts = [raw[0] // 40, raw[0] % 40]
    n = 0
    for byte in raw[1:]:
        n = (n << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(n)
            n = 0
    return ".".join(map(str, parts))


def _expect(node: _Node, tag: int, what: str) -> list[_Node]:
    if node.tag != tag:
        raise _Malformed(f"expected {what}")
    return node.children()


# --- the PE file ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Offsets:
    """Where a PE image keeps what signing changes."""

    checksum: int  # the optional header's CheckSum field
    cert_entry: int  # the certificate table's data directory entry (offset, size)
    table_at: int  # the certificate table (a file offset)
    table_size: int


@dataclass(frozen=True)
class _Layout:
    regions: list[tuple[int, int]]  # what the Authenticode hash covers, in order
    table: bytes  # the certificate table
    offsets: Offsets


def _layout(image: Image) -> _Layout:
    if image[:2] != b"MZ" or len(image) < 0x40:
        raise _Malformed("not a PE image (no MZ header)")
    pe = struct.unpack_from("<I", image, 0x3C)[0]
    if image[pe : pe + 4] != b"PE\0\0":
        raise _Malformed("not a PE image (no PE signature)")
    coff = pe + 4
    sections, optional_size = (
        struct.unpack_from("<H", image, coff + 2)[0],
        struct.unpack_from("<H", image, coff + 16)[0],
    )
    optional = coff + 20
    magic = struct.unpack_from("<H", image, optional)[0]
    if magic == 0x20B:  # PE32+
        directories, count_at = optional + 112, optional + 108
    elif magic == 0x10B:  # PE32
        directories, count_at = optional + 96, optional + 92
    else:
        raise _Malformed(f"an optional header of unknown magic {magic:#x}")
    if struct.unpack_from("<I", image, count_at)[0] < 5:
        raise _Malformed("no certificate table directory")
    checksum = optional + 64
    headers_end = struct.unpack_from("<I", image, optional + 60)[0]
    cert_entry = directories + 4 * 8
    table_at, table_size = struct.unpack_from("<II", image, cert_entry)
    if table_size and (table_at < headers_end or table_at + table_size > len(image)):
        raise _Malformed("the certificate table lies outside the file")
    regions = [(0, checksum), (checksum + 4, cert_entry), (cert_entry + 8, headers_end)]
    table_start = optional + optional_size
    raw = []
    for k in range(sections):
        size, pointer = struct.unpack_from("<II", image, table_start + 40 * k + 16)
        if size:
            raw.append((pointer, pointer + size))
    hashed = headers_end
    for start, end in sorted(raw):
        if end > len(image):
            raise _Malformed("a section lies outside the file")
        regions.append((start, end))
        hashed += end - start
    end = table_at if table_size else len(image)
    if hashed < end:  # data after the sections (debug data, padding before the table)
        regions.append((hashed, end))
    table = bytes(image[table_at : table_at + table_size]) if table_size else b""
    return _Layout(regions, table, Offsets(checksum, cert_entry, table_at, table_size))


def offsets(image: Image) -> Offsets:
    """Where `image` keeps its checksum and certificate table, for a signer."""
    try:
        return _layout(image).offsets
    except (_Malformed, struct.error) as e:
        raise VerificationError(f"not a signable PE image: {e}") from e


def der_contents(encoded: bytes) -> bytes:
    """The value octets of one DER element (what Authenticode hashes of its content)."""
    try:
        return _read(encoded)[0].value
    except _Malformed as e:
        raise VerificationError(f"malformed DER: {e}") from e


def image_digest(image: Image) -> bytes:
    """The Authenticode sha256 of a PE image, as signtools and firmware compute it."""
    try:
        layout = _layout(image)
    except (_Malformed, struct.error) as e:
        raise VerificationError(f"not a signable PE image: {e}") from e
    digest = hashlib.sha256()
    view = memoryview(image)
    for start, end in layout.regions:
        digest.update(view[start:end])
    return digest.digest()


# --- the signatures ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """One signature of an image: the certificate that made it and the others it carries."""

    signer: x509.Certificate
    certificates: tuple[x509.Certificate, ...]
    digest: bytes  # the image hash it signs
    valid: bool  # the PKCS#7 signature over that hash verifies with the signer's key

    def describe(self) -> str:
        return describe(self.signer)


def describe(certificate: x509.Certificate) -> str:
    der = certificate.public_bytes(Encoding.DER)
    return f"{certificate.subject.rfc4514_string()} (sha256 {hashlib.sha256(der).hexdigest()})"


def signatures(image: Image) -> list[Signature]:
    """The Authenticode signatures in the image's certificate table (none: unsigned)."""
    try:
        table = _layout(image).table
        out = []
        while len(table) >= 8:
            length, _revision, kind = struct.unpack_from("<IHH", table)
            if length < 8 or length > len(table):
                raise _Malformed("a WIN_CERTIFICATE whose length runs past the table")
            if kind == _WIN_CERT_PKCS7:
                out.append(_signature(table[8:length]))
            table = table[(length + 7) // 8 * 8 :]
        return out
    except (_Malformed, struct.error, ValueError) as e:
        raise VerificationError(f"a malformed Authenticode signature: {e}") from e


def _signature(der: bytes) -> Signature:
    info, _ = _read(der)
    content_type, wrapped = _expect(info, 0x30, "a PKCS#7 ContentInfo")[:2]
    if _oid(content_type) != OID_SIGNED_DATA:
        raise _Malformed("not PKCS#7 SignedData")
    signed = _expect(wrapped, 0xA0, "explicit content")[0]
    fields = _expect(signed, 0x30, "SignedData")
    content = _expect(fields[2], 0x30, "the signed content")
    if _oid(content[0]) != OID_INDIRECT_DATA:
        raise _Malformed("not Authenticode content (SpcIndirectDataContent)")
    indirect = _expect(content[1], 0xA0, "explicit content")[0]
    _data, digest_info = _expect(indirect, 0x30, "SpcIndirectDataContent")[:2]
    algorithm, digest = _expect(digest_info, 0x30, "DigestInfo")[:2]
    if _oid(_expect(algorithm, 0x30, "an algorithm")[0]) != OID_SHA256 or digest.tag != 0x04:
        raise _Malformed("an image digest other than sha256")
    certificates = tuple(
        x509.load_der_x509_certificate(member.data)
        for node in fields[3:]
        if node.tag == 0xA0  # [0] IMPLICIT: the certificates
        for member in node.children()
    )
    signer_infos = [node for node in fields[3:] if node.tag == 0x31]
    if not signer_infos or not signer_infos[0].children():
        raise _Malformed("no SignerInfo")
    signer_info = _expect(signer_infos[0].children()[0], 0x30, "SignerInfo")
    issuer_serial = _expect(signer_info[1], 0x30, "IssuerAndSerialNumber")
    issuer, serial = issuer_serial[0].data, int.from_bytes(issuer_serial[1].value, "big")
    signer = next(
        (
            c
            for c in certificates
            if c.serial_number == serial and c.issuer.public_bytes() == issuer
        ),
        None,
    )
    if signer is None:
        raise _Malformed("the signer's certificate is not in the signature")
    attributes = signer_info[3]
    if attributes.tag != 0xA0:
        raise _Malformed("no authenticated attributes")
    message_digest = None
    for attribute in attributes.children():
        oid, values = _expect(attribute, 0x30, "an attribute")[:2]
        if _oid(oid) == OID_MESSAGE_DIGEST:
            message_digest = values.children()[0].value
    # Authenticode signs the SpcIndirectDataContent's contents, without its tag and length.
    valid = message_digest == hashlib.sha256(indirect.value).digest()
    encrypted = signer_info[5].value
    key = signer.public_key()
    if valid and isinstance(key, rsa.RSAPublicKey):
        signed_attributes = b"\x31" + attributes.data[1:]  # [0] IMPLICIT -> SET OF, as signed
        try:
            key.verify(encrypted, signed_attributes, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            valid = False
    else:
        valid = False
    return Signature(signer, certificates, digest.value, valid)


# --- the databases ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Database:
    """db or dbx: its X.509 certificates and its sha256 image hashes."""

    certificates: tuple[x509.Certificate, ...] = ()
    hashes: frozenset[bytes] = frozenset()


def parse_database(raw: bytes, where: str) -> Database:
    """EFI_SIGNATURE_LISTs (after efivarfs's 4 bytes of attributes) as a Database."""
    certificates = []
    found: set[bytes] = set()
    data = raw[4:]
    try:
        while data:
            kind = uuid.UUID(bytes_le=data[:16])
            list_size, header_size, size = struct.unpack_from("<III", data, 16)
            if list_size < 28 + header_size or list_size > len(data) or size < 16:
                raise _Malformed(f"an EFI_SIGNATURE_LIST of {list_size} bytes")
            entries = data[28 + header_size : list_size]
            for at in range(0, len(entries) - size + 1, size):
                entry = entries[at + 16 : at + size]
                if kind == CERT_X509:
                    certificates.append(x509.load_der_x509_certificate(entry))
                elif kind == CERT_SHA256:
                    found.add(bytes(entry))
            data = data[list_size:]
    except (_Malformed, struct.error, ValueError) as e:
        raise VerificationError(f"cannot read {where}: {e}") from e
    return Database(tuple(certificates), frozenset(found))


def read_database(efivars: Path, name: str) -> Database:
    """db or dbx from efivarfs; an absent variable is an empty database."""
    path = efivars / f"{name}-{SECURITY_GUID}"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Database()
    except OSError as e:
        raise VerificationError(f"cannot read {path}: {e}") from e
    return parse_database(raw, str(path))


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _chain(signature: Signature, db: Database) -> list[x509.Certificate] | None:
    """The signer up to a db certificate (both included), through the certificates the
    signature carries; None when it reaches none."""
    trusted = {c.public_bytes(Encoding.DER): c for c in db.certificates}
    chain = [signature.signer]
    for _ in range(_MAX_CHAIN):
        current = chain[-1]
        if current.public_bytes(Encoding.DER) in trusted:
            return chain
        anchor = next((c for c in db.certificates if _issued_by(current, c)), None)
        if anchor is not None:
            return [*chain, anchor]
        parent = next(
            (c for c in signature.certificates if c not in chain and _issued_by(current, c)),
            None,
        )
        if parent is None:
            return None
        chain.append(parent)
    return None


def check_image(image: Image, db: Database, dbx: Database, what: str) -> Signature:
    """The signature through which the firmware would start `image`; VerificationError naming
    the certificates otherwise (unsigned, a signature that does not verify or does not chain
    to db, or one that dbx revokes)."""
    digest = image_digest(image)
    if digest in dbx.hashes:
        raise VerificationError(f"refused {what}: its hash {digest.hex()} is in dbx (revoked)")
    found = signatures(image)
    if not found:
        raise VerificationError(
            f"refused {what}: it is not signed, and Secure Boot is enforced here: the firmware "
            "would not start it"
        )
    revoked = {c.public_bytes(Encoding.DER) for c in dbx.certificates}
    problems = []
    for signature in found:
        if signature.digest != digest or not signature.valid:
            problems.append(f"a signature by {signature.describe()} that does not match the image")
            continue
        chain = _chain(signature, db)
        if chain is None:
            problems.append(f"signed by {signature.describe()}, which chains to no db certificate")
            continue
        bad = [c for c in chain if c.public_bytes(Encoding.DER) in revoked]
        if bad:
            problems.append(
                f"signed by {signature.describe()}, revoked in dbx by {describe(bad[0])}"
            )
            continue
        return signature
    trusted = "; ".join(describe(c) for c in db.certificates) or "none"
    raise VerificationError(
        f"refused {what}: {'; '.join(problems)}; this machine's db holds: {trusted}"
    )
