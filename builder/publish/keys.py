"""The keys directory: the roles' keys, the root metadata they sign, how long signatures last.

The keys directory (`keys/` by default, never in git):

    root.json, 1.root.json, 2.root.json ...   public root metadata; root.json is the newest and is
                                              what an image embeds as its trust anchor
    root-1.pem ... root-N.pem                 root private keys: needed only by `init_keys` and
                                              `rotate_key`; keep them offline after init
    targets.pem, snapshot.pem, timestamp.pem  online keys: every publish needs them
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, Signer, SSlibKey
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from builder.errors import PublishError
from updater.files import fsync_dir, write_file_atomic
from updater.release.channel import format_time

ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
ONLINE_ROLES = (Targets.type, Snapshot.type, Timestamp.type)
EXPIRY: Mapping[str, timedelta] = MappingProxyType(
    {
        Root.type: timedelta(days=365),
        Targets.type: timedelta(days=14),
        Snapshot.type: timedelta(days=14),
        Timestamp.type: timedelta(days=1),
    }
)
SERIALIZER = JSONSerializer(compact=False)


def signing_time(now: datetime | None) -> datetime:
    """The time a change is signed at, expiry dates counted from it: `now`, or the clock."""
    when = now if now is not None else datetime.now(UTC)
    if when.tzinfo is None:
        raise ValueError("now must carry a time zone")
    return when.astimezone(UTC).replace(microsecond=0)


def _root_key_path(keys_dir: Path, index: int) -> Path:
    return keys_dir / f"root-{index}.pem"


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: a key file is never overwritten, not even by a race with a second `keys init`.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)


def init_keys(
    keys_dir: Path,
    root_threshold: int = 1,
    root_keys: int = 1,
    *,
    now: datetime | None = None,
) -> None:
    """Create ed25519 keys for every role and the first signed root metadata (the trust anchor)."""
    if not 1 <= root_threshold <= root_keys:
        raise PublishError(
            f"root threshold {root_threshold} with {root_keys} root key(s) cannot be met",
            hint="the threshold must be between 1 and the number of root keys",
        )
    existing = [p.name for p in _key_dir_files(keys_dir)]
    if existing:
        raise PublishError(
            f"{keys_dir} already holds keys or metadata ({', '.join(sorted(existing))})",
            hint="keys are never overwritten; choose another directory or rotate a key instead",
        )
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys_dir.chmod(0o700)
    when = signing_time(now)

    root = Root(expires=when + EXPIRY[Root.type], consistent_snapshot=True)
    root_signers = [CryptoSigner.generate_ed25519() for _ in range(root_keys)]
    for signer in root_signers:
        root.add_key(signer.public_key, Root.type)
    root.roles[Root.type].threshold = root_threshold
    online = {role: CryptoSigner.generate_ed25519() for role in ONLINE_ROLES}
    for role, signer in online.items():
        root.add_key(signer.public_key, role)

    for index, signer in enumerate(root_signers, start=1):
        _write_new(_root_key_path(keys_dir, index), signer.private_bytes, 0o600)
    for role, signer in online.items():
        _write_new(keys_dir / f"{role}.pem", signer.private_bytes, 0o600)

    metadata = Metadata(root)
    for signer in root_signers:
        metadata.sign(signer, append=True)
    data = metadata.to_bytes(SERIALIZER)
    _write_new(keys_dir / "1.root.json", data, 0o644)
    _write_new(keys_dir / "root.json", data, 0o644)


def _key_dir_files(keys_dir: Path) -> list[Path]:
    if not keys_dir.exists():
        return []
    return [
        p
        for p in keys_dir.iterdir()
        if p.suffix == ".pem" or p.name == "root.json" or p.name.endswith(".root.json")
    ]


def load_trusted_root(keys_dir: Path) -> Metadata[Root]:
    """The newest root metadata of a keys directory, checked to be signed by its own threshold."""
    path = keys_dir / "root.json"
    if not path.exists():
        raise PublishError(
            f"{path} does not exist",
            hint=f"create keys with `./build.py keys init --keys {keys_dir}`",
        )
    try:
        root: Metadata[Root] = Metadata[Root].from_file(str(path))
        root.verify_delegate(Root.type, root)
    except UnsignedMetadataError as e:
        raise PublishError(f"{path}: not signed by its own root keys: {e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise PublishError(f"{path}: not valid root metadata: {e}") from None
    if not isinstance(root.signed, Root):
        raise PublishError(f"{path}: expected root metadata, found {root.signed.type}")
    versioned = keys_dir / f"{root.signed.version}.root.json"
    if not versioned.exists() or versioned.read_bytes() != path.read_bytes():
        raise PublishError(
            f"{versioned} is missing or differs from {path}",
            hint="root.json must be a copy of the newest <N>.root.json; restore it from a backup",
        )
    return root


def _load_signer(keys_dir: Path, root: Root, role: str, path: Path | None = None) -> Signer:
    key_path = path if path is not None else keys_dir / f"{role}.pem"
    try:
        private = load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError:
        raise PublishError(
            f"the {role} private key {key_path} is missing",
            hint=(
                "root keys are only needed for init and rotation; bring them back from offline "
                "storage"
                if role == Root.type
                else f"publishing needs the {role} key in {keys_dir}"
            ),
        ) from None
    except ValueError as e:
        raise PublishError(f"{key_path}: not a PEM private key: {e}") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise PublishError(f"{key_path}: expected an ed25519 key")
    public = SSlibKey.from_crypto(private.public_key(), scheme="ed25519")
    if public.keyid not in root.roles[role].keyids:
        raise PublishError(
            f"{key_path} is not a {role} key of root version {root.version}",
            hint="the key was rotated out, or the file belongs to another keys directory",
        )
    return CryptoSigner(private, root.keys[public.keyid])


def _root_signers(keys_dir: Path, root: Root) -> list[Signer]:
    signers = [
        _load_signer(keys_dir, root, Root.type, path)
        for path in sorted(keys_dir.glob("root-*.pem"))
    ]
    if len(signers) < root.roles[Root.type].threshold:
        raise PublishError(
            f"{len(signers)} root key(s) in {keys_dir}, root threshold is "
            f"{root.roles[Root.type].threshold}",
            hint="bring the root keys back from offline storage (root-*.pem)",
        )
    return signers


def online_signers(keys_dir: Path, root: Root, roles: tuple[str, ...]) -> dict[str, Signer]:
    """The signers of `roles` from the keys directory, each checked to hold a key of `root`."""
    return {role: _load_signer(keys_dir, root, role) for role in roles}


def rotate_key(keys_dir: Path, role: str, *, now: datetime | None = None) -> None:
    """Replace `role`'s key with a new one and sign a new root version.

    Needs the root keys. The retired private key stays as `<role>.<keyid prefix>.retired.pem`.
    For root itself, the new root version is signed by the old and the new root keys, so machines
    that trust the old root accept it. Publish or refresh afterwards: that copies the new root
    metadata into the repository and re-signs with the new key.
    """
    if role not in ROLES:
        raise PublishError(f"unknown role {role!r}", hint=f"one of {', '.join(ROLES)}")
    when = signing_time(now)
    current = load_trusted_root(keys_dir)
    old_root_signers = _root_signers(keys_dir, current.signed)
    new = Metadata[Root].from_bytes(current.to_bytes())
    root = new.signed
    new_signer = CryptoSigner.generate_ed25519()

    if role == Root.type:
        # Replace one root key (the first file): the threshold is unchanged.
        old_path = sorted(keys_dir.glob("root-*.pem"))[0]
        old_keyid = old_root_signers[0].public_key.keyid
        root.revoke_key(old_keyid, Root.type)
        root.add_key(new_signer.public_key, Root.type)
        retired = keys_dir / f"root.{old_keyid[:12]}.retired.pem"
        new_path = old_path
    else:
        old_path = keys_dir / f"{role}.pem"
        old_keyids = list(root.roles[role].keyids)
        for keyid in old_keyids:
            root.revoke_key(keyid, role)
        root.add_key(new_signer.public_key, role)
        retired = keys_dir / f"{role}.{old_keyids[0][:12]}.retired.pem"
        new_path = old_path

    root.version += 1
    root.expires = when + EXPIRY[Root.type]
    new.signatures.clear()
    signers = list(old_root_signers)
    if role == Root.type:
        signers.append(new_signer)
    for signer in signers:
        new.sign(signer, append=True)
    data = new.to_bytes(SERIALIZER)

    if old_path.exists():
        os.rename(old_path, retired)
    _write_new(new_path, new_signer.private_bytes, 0o600)
    _write_new(keys_dir / f"{root.version}.root.json", data, 0o644)
    write_file_atomic(keys_dir / "root.json", data)


def renew_root(keys_dir: Path, *, now: datetime | None = None) -> None:
    """Sign a new root version with a fresh expiry and the same keys (needs the root keys)."""
    when = signing_time(now)
    current = load_trusted_root(keys_dir)
    signers = _root_signers(keys_dir, current.signed)
    new = Metadata[Root].from_bytes(current.to_bytes())
    new.signed.version += 1
    new.signed.expires = when + EXPIRY[Root.type]
    new.signatures.clear()
    for signer in signers:
        new.sign(signer, append=True)
    data = new.to_bytes(SERIALIZER)
    _write_new(keys_dir / f"{new.signed.version}.root.json", data, 0o644)
    write_file_atomic(keys_dir / "root.json", data)


def describe_keys(keys_dir: Path) -> dict[str, object]:
    """Roles, key ids, thresholds and expiry of the newest root, for `keys show`."""
    root = load_trusted_root(keys_dir).signed
    return {
        "version": root.version,
        "expires": format_time(root.expires),
        "roles": {
            role: {"threshold": root.roles[role].threshold, "keyids": root.roles[role].keyids}
            for role in ROLES
        },
        "private_keys": sorted(p.name for p in keys_dir.glob("*.pem")),
    }
