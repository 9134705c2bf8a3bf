"""The keys directory: the roles' keys, the root metadata they sign, how long signatures last.

The keys directory (`keys/` by default, never in git):

    root.json, 1.root.json, 2.root.json ...   public root metadata; root.json is the newest and is
                                              what an image embeds as its trust anchor
    root-1.pem ... root-N.pem                 root private keys: needed only by `init_keys` and
                                              `rotate_key`; keep them offline after init
    targets.pem, snapshot.pem, timestamp.pem  online keys: every publish needs them

Private keys are created 0600 in a 0700 directory, by the mode given to open(2) and mkdir(2)
rather than a chmod afterwards, so no key is ever readable by anyone else, not even for a moment.
Every operation that signs, or lists the private keys, first refuses a directory whose keys or
metadata others could read or change (`open_keys`): the message names each path, its mode and the
command that fixes it.
"""

from __future__ import annotations

import os
import pwd
import shlex
import stat
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


# Modes that keep the keys private: group and others get nothing of the directory or a private
# key, and may read but never write the public root metadata.
DIR_MODE = 0o700
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


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
    if keys_dir.exists():
        # An empty directory someone else owns could be read or emptied by them later.
        _refuse(keys_dir, [_owner_problem(keys_dir, keys_dir.stat(), "it")])
    # mkdir's mode (less the umask) is the mode from the start; the chmod is for a directory that
    # already existed, empty, and is done before any key is written into it.
    keys_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    keys_dir.chmod(DIR_MODE)
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
        _write_new(_root_key_path(keys_dir, index), signer.private_bytes, PRIVATE_MODE)
    for role, signer in online.items():
        _write_new(keys_dir / f"{role}.pem", signer.private_bytes, PRIVATE_MODE)

    metadata = Metadata(root)
    for signer in root_signers:
        metadata.sign(signer, append=True)
    data = metadata.to_bytes(SERIALIZER)
    _write_new(keys_dir / "1.root.json", data, PUBLIC_MODE)
    _write_new(keys_dir / "root.json", data, PUBLIC_MODE)


def has_keys(keys_dir: Path) -> bool:
    """Whether `keys_dir` holds TUF keys or root metadata already."""
    return bool(_key_dir_files(keys_dir))


def _key_dir_files(keys_dir: Path) -> list[Path]:
    if not keys_dir.exists():
        return []
    return [
        p
        for p in keys_dir.iterdir()
        if p.suffix == ".pem" or p.name == "root.json" or p.name.endswith(".root.json")
    ]


def _who(bits: int) -> str:
    return " and ".join(name for name, mask in (("group", 0o070), ("others", 0o007)) if bits & mask)


def _mode_problem(
    path: Path, st: os.stat_result, what: str, forbidden: int, fix: str
) -> tuple[str, str] | None:
    """(what is wrong, the chmod that fixes it) when `path`'s mode has any `forbidden` bit;
    `what` names the path in the message."""
    mode = stat.S_IMODE(st.st_mode)
    extra = mode & forbidden
    if not extra:
        return None
    enter = "enter" if stat.S_ISDIR(st.st_mode) else "execute"
    rights = [v for v, mask in (("read", 0o044), ("write", 0o022), (enter, 0o011)) if extra & mask]
    return (
        f"{what} has mode {mode:04o}: {_who(extra)} can {' and '.join(rights)} it",
        f"chmod {fix} {shlex.quote(str(path))}",
    )


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _owner_problem(path: Path, st: os.stat_result, what: str) -> tuple[str, str] | None:
    """(what is wrong, the chown that fixes it) when `path` belongs to another user than root or
    the one running this: that user could change its mode, or swap the key, at any time."""
    me = os.geteuid()
    if st.st_uid in (me, 0):
        return None
    expected = "root" if me == 0 else f"{_user_name(me)} (uid {me}) or root"
    return (
        f"{what} is owned by {_user_name(st.st_uid)} (uid {st.st_uid}), not by {expected}",
        f"chown {shlex.quote(_user_name(me))} {shlex.quote(str(path))}",
    )


def _private_key_problems(
    private: Path,
) -> tuple[Path | None, list[tuple[str, str] | None]]:
    """`private` when it exists (None: offline), with what is wrong with its mode and owner."""
    try:
        st = private.stat()
    except FileNotFoundError:
        return None, []
    return private, [
        _mode_problem(private, st, f"the private key {private}", 0o077, f"{PRIVATE_MODE:o}"),
        _owner_problem(private, st, str(private)),
    ]


def _refuse(keys_dir: Path, problems: list[tuple[str, str] | None]) -> None:
    found = [p for p in problems if p is not None]
    if not found:
        return
    fixes = [fix for _, fix in found]
    hint = "fix it with: " + "; ".join(fixes)
    if any(fix.startswith("chown") for fix in fixes):
        hint += " (chown as root, once you know why another user owns them)"
    raise PublishError(
        f"keys directory {keys_dir} is not private: " + "; ".join(what for what, _ in found),
        hint=hint,
    )


def check_keys_dir(keys_dir: Path) -> None:
    """Refuse a keys directory that another user could read or change.

    The directory and every private key must be the owner's alone (0700, 0600); the public root
    metadata may be read by anyone but written only by its owner. Everything must belong to the
    user running this or to root. All problems are listed at once, each with its fix.
    """
    _require_keys_dir(keys_dir)
    st = keys_dir.stat()
    problems = [
        _mode_problem(keys_dir, st, "it", 0o077, f"{DIR_MODE:o}"),
        _owner_problem(keys_dir, st, "it"),
    ]
    for path in sorted(_key_dir_files(keys_dir)):
        try:
            st = path.stat()
        except OSError:
            # A link to an unplugged offline disk, say: whoever needs the file says it is missing.
            continue
        if path.suffix == ".pem":
            problems.append(
                _mode_problem(path, st, f"the private key {path}", 0o077, f"{PRIVATE_MODE:o}")
            )
        else:
            # Anyone may read the public root; a writer could swap the trust anchor.
            problems.append(_mode_problem(path, st, f"the root metadata {path}", 0o022, "go-w"))
        problems.append(_owner_problem(path, st, str(path)))
    _refuse(keys_dir, problems)


def _require_keys_dir(keys_dir: Path) -> None:
    if not keys_dir.exists():
        raise PublishError(
            f"no keys directory at {keys_dir}",
            hint=f"create keys with `./build.py keys init --keys {keys_dir}`",
        )
    if not keys_dir.is_dir():
        raise PublishError(f"{keys_dir}: expected a keys directory, found a file")


def open_keys(keys_dir: Path) -> Metadata[Root]:
    """The newest root of a keys directory whose private keys are to be used or listed, after
    `check_keys_dir`: what every signing operation, and `keys show`, starts with."""
    check_keys_dir(keys_dir)
    return load_trusted_root(keys_dir)


def load_trusted_root(keys_dir: Path) -> Metadata[Root]:
    """The newest root metadata of a keys directory, checked to be signed by its own threshold."""
    _require_keys_dir(keys_dir)
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
    except OSError as e:
        raise PublishError(f"cannot read {path}: {e.strerror}") from None
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
    except OSError as e:
        raise PublishError(f"cannot read the {role} private key {key_path}: {e.strerror}") from None
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
    current = open_keys(keys_dir)
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
    _write_new(new_path, new_signer.private_bytes, PRIVATE_MODE)
    _write_new(keys_dir / f"{root.version}.root.json", data, PUBLIC_MODE)
    write_file_atomic(keys_dir / "root.json", data)


def renew_root(keys_dir: Path, *, now: datetime | None = None) -> None:
    """Sign a new root version with a fresh expiry and the same keys (needs the root keys)."""
    when = signing_time(now)
    current = open_keys(keys_dir)
    signers = _root_signers(keys_dir, current.signed)
    new = Metadata[Root].from_bytes(current.to_bytes())
    new.signed.version += 1
    new.signed.expires = when + EXPIRY[Root.type]
    new.signatures.clear()
    for signer in signers:
        new.sign(signer, append=True)
    data = new.to_bytes(SERIALIZER)
    _write_new(keys_dir / f"{new.signed.version}.root.json", data, PUBLIC_MODE)
    write_file_atomic(keys_dir / "root.json", data)


def describe_keys(keys_dir: Path) -> dict[str, object]:
    """Roles, key ids, thresholds and expiry of the newest root, for `keys show`."""
    root = open_keys(keys_dir).signed
    return {
        "version": root.version,
        "expires": format_time(root.expires),
        "roles": {
            role: {"threshold": root.roles[role].threshold, "keyids": root.roles[role].keyids}
            for role in ROLES
        },
        "private_keys": sorted(p.name for p in keys_dir.glob("*.pem")),
    }
