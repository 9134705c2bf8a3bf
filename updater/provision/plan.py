"""What a first-boot config asks the machine to do, whichever format it came in.

Ignition and cloud-config are parsed into the same `Plan`, so that one applier stages and commits
both, and "nothing half-applied" is proven once. Every parser error is a `ProvisionError` whose
message names the config's source, the field (as a path such as `storage.files[2].mode`) and what
was expected: the operator reads it on the serial console of a machine that cannot be logged in to.

Standard library (and updater.files) only: the parsers, the sources and the applier all import this.
"""

from __future__ import annotations

import posixpath
import re
import reprlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum

from updater.files import resolve_in_root

# Where provisioning may write: the rest of the tree is the read-only, verity-protected image
# (`/usr`, `/bin`, ...) or volatile (`/run`, `/tmp`), where a file would silently vanish.
WRITABLE_ROOTS = ("/etc", "/var", "/home", "/root")

MiB = 1 << 20
# The most one decompression may produce: gzip'd user-data, a write_files entry, an Ignition file's
# contents or append, a VMware guestinfo value. Deflate expands up to about 1000 times, so a config
# of a few MiB could ask for gigabytes; 64 MiB is far beyond any config or file in /etc, and small
# enough that the plan, which is held in memory before anything is written, stays in memory.
MAX_DECOMPRESSED = 64 * MiB
# Concatenated gzip members in one stream (`cat a.gz b.gz`): a few in practice.
MAX_GZIP_MEMBERS = 64
# All the file contents of one plan together: many files just under the cap are as bad as one bomb.
MAX_PLAN_CONTENTS = 128 * MiB

# Linux's limits on a path and on one name in it (bytes).
PATH_MAX = 4096
NAME_MAX = 255

# useradd's rule (Debian's default NAME_REGEX without the `$` machine-account suffix).
USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
HOSTNAME = re.compile(r"(?=.{1,64}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# systemd's UNIT_NAME_MAX is 255 characters, a file name's length on Linux.
UNIT_NAME = re.compile(
    r"(?=.{1,255}$)[A-Za-z0-9:_.\\@-]+\.(service|socket|target|timer|path|mount|automount|swap"
    r"|slice|scope|device|container|volume|network|kube|pod|image|build)"
)


# The longest a value from a config is shown in a message, and the longest a key or field name.
SHOWN_LENGTH = 80
# A crypt(3) hash: `$id$` then the salt and hash alphabet (yescrypt `$y$`, sha512crypt `$6$`,
# sha256crypt `$5$`, bcrypt `$2b$`, md5crypt `$1$`, ...). Traditional 13-character DES hashes are
# not accepted: a 13-character plain-text password would pass for one. A colon or a newline would
# corrupt /etc/shadow. An account is locked by `!` (alone, or before a hash: `passwd -l`) or `*`.
CRYPT_HASH = re.compile(r"!?\$[0-9a-z]+\$[./0-9A-Za-z$=,]+|[!*]")


class ProvisionError(Exception):
    """A config cannot be found, read, understood or applied. Nothing has been changed."""


class _Bounded(reprlib.Repr):
    """repr() of a config's value, cut short: a YAML alias bomb has billions of elements, a
    self-referencing one is infinite, and an int past 4300 digits cannot be printed at all."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = 6
        self.maxother = SHOWN_LENGTH
        self.maxstring = self.maxlong = SHOWN_LENGTH

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 256:
            return f"<an integer of {len(hex(x)) - 2} hex digits>"
        return super().repr_int(x, level)


_BOUNDED = _Bounded()


def shown(value: object) -> str:
    """`value` for a message: repr()'d, nested parts elided, at most SHOWN_LENGTH characters."""
    text = _BOUNDED.repr(value)
    return text if len(text) <= SHOWN_LENGTH else text[: SHOWN_LENGTH - 3] + "..."


def key_name(key: object) -> str:
    """A mapping's key as part of a field path: a YAML key may be a number, `null`, a date, or
    an integer too long to print."""
    if isinstance(key, str):
        return key if len(key) <= SHOWN_LENGTH else key[: SHOWN_LENGTH - 3] + "..."
    return shown(key)


def field_error(source: str, path: str, expected: str, got: object = None) -> ProvisionError:
    """`<source>: <path>: expected <expected>[, got <got>]` — the one shape of a config error."""
    message = f"{source}: {path}: expected {expected}"
    if got is not None:
        message += f", got {shown(got)}"
    return ProvisionError(message)


def unsupported(source: str, path: str, what: str = "") -> ProvisionError:
    """A field Berth does not implement: refused by name, never silently ignored."""
    detail = f" ({what})" if what else ""
    if len(path) > 2 * SHOWN_LENGTH:  # the path ends in a key the config made up
        path = path[: 2 * SHOWN_LENGTH - 3] + "..."
    return ProvisionError(f"{source}: {path}: not supported by Berth{detail}")


def check_password_hash(source: str, where: str, value: object) -> str:
    """A crypt(3) hash or a locked form (CRYPT_HASH); the value is never shown: it may be a
    plain-text password, bound for a console."""
    if not isinstance(value, str) or not CRYPT_HASH.fullmatch(value):
        raise field_error(
            source,
            where,
            "a crypt(3) hash such as `mkpasswd -m yescrypt` prints ('$y$...', '$6$...'), or '!' "
            "or '*' for a locked password; never a plain-text password",
            None if isinstance(value, str) else type(value).__name__,
        )
    return value


def check_strings(source: str, tree: object, top: str = "") -> None:
    """Refuse a parsed document whose strings (keys included) cannot be written as UTF-8: JSON's
    `\\ud800` and YAML's `"\\ud800"` decode to lone surrogates, which every later step (a
    file's bytes, the console) would trip over.

    Walked without recursion, each container once: a document may be nested as deep as its parser
    allows, and YAML aliases may share (or contain) one container many times over."""
    seen: set[int] = set()
    pending: list[tuple[str, object]] = [(top, tree)]
    while pending:
        where, value = pending.pop()
        if isinstance(value, str):
            _check_utf8(source, where, value)
        elif isinstance(value, dict | list):
            if id(value) in seen:
                continue
            seen.add(id(value))
            pending.extend(_children(source, where, value))


def _children(
    source: str, where: str, value: dict[object, object] | list[object]
) -> Iterator[tuple[str, object]]:
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield f"{where}[{i}]", item
        return
    for key, item in value.items():
        if isinstance(key, str):
            _check_utf8(source, where or "(top level)", key)
        name = key_name(key)
        yield (f"{where}.{name}" if where else name), item


def _check_utf8(source: str, where: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise field_error(
            source,
            where or "(top level)",
            f"text that is valid Unicode (a lone surrogate \\u{ord(text[e.start]):04x} is at "
            f"character {e.start})",
        ) from None


class NotGzip(ProvisionError):
    """Data that should be gzip but does not decompress; `reason` says why, for callers to word."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def gunzip(data: bytes, source: str, where: str) -> bytes:
    """`data` decompressed, or a ProvisionError naming `source`, `where` and the cap.

    Streamed, and stopped one byte past MAX_DECOMPRESSED: a bomb costs at most that much memory
    and the time to inflate it, never its full size. Concatenated gzip members are read as one
    stream and trailing zero bytes ignored, as gzip(1) and Python's gzip module do.
    """
    try:
        out = _inflate(data, MAX_DECOMPRESSED)
    except (EOFError, ValueError, zlib.error) as e:
        raise NotGzip(str(field_error(source, where, f"gzip data ({e})")), str(e)) from None
    if out is None:
        raise field_error(
            source,
            where,
            f"gzip data that decompresses to at most {MAX_DECOMPRESSED // MiB} MiB "
            "(decompressing stopped there)",
        )
    return out


def _inflate(data: bytes, limit: int) -> bytes | None:
    """The gzip members in `data` inflated; None as soon as they pass `limit` bytes."""
    out = bytearray()
    rest = data
    if rest and not rest.startswith(b"\x1f\x8b"):
        raise ValueError("no gzip header")
    members = 0
    # No data is no members, as for gzip.decompress; zero bytes after a member are padding.
    while rest := rest.lstrip(b"\0"):
        if not rest.startswith(b"\x1f\x8b"):
            raise ValueError("data after the end of the gzip stream that is not gzip")
        members += 1
        if members > MAX_GZIP_MEMBERS:
            # Each member costs a copy of what follows it: 16 MiB of empty members (20 bytes
            # each) would take gzip.decompress a quarter of an hour and produce nothing.
            raise ValueError(f"more than {MAX_GZIP_MEMBERS} concatenated gzip members")
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing, CRC and size checked
        pending = rest
        while True:
            # max_length keeps each step's output (and so memory) within what is left of the cap.
            chunk = inflater.decompress(pending, limit + 1 - len(out))
            out += chunk
            if len(out) > limit:
                return None
            if inflater.eof:
                break
            pending = inflater.unconsumed_tail
            if not chunk and not pending:
                raise EOFError("the data ends before the end of the gzip stream")
        rest = inflater.unused_data
    return bytes(out)


def check_plan_contents(source: str, where: str, total: int) -> None:
    """Refuse a plan once its files' contents, counted as they are decoded, pass the cap."""
    if total > MAX_PLAN_CONTENTS:
        raise field_error(
            source,
            where,
            f"file contents that, with the files before it, stay within "
            f"{MAX_PLAN_CONTENTS // MiB} MiB in all (the whole config is held in memory)",
        )


# Where units go: quadlet files are read by podman's systemd generator from QUADLET_DIR, other
# units from systemd's admin directory. Both are in /etc, the writable overlay that survives
# updates.
SYSTEMD_DIR = "/etc/systemd/system"
QUADLET_DIR = "/etc/containers/systemd"
QUADLET_SUFFIXES = (".container", ".volume", ".network", ".kube", ".pod", ".image", ".build")
# What creating or changing accounts rewrites (see apply.py), and where new homes go.
ACCOUNT_FILES = ("/etc/passwd", "/etc/shadow", "/etc/group", "/etc/gshadow")
HOME_DIR = "/home"


def unit_path(name: str) -> str:
    """Where the unit (or quadlet file) `name` is written."""
    return f"{QUADLET_DIR if name.endswith(QUADLET_SUFFIXES) else SYSTEMD_DIR}/{name}"


def user_home(name: str) -> str:
    """The home a plan's user is known to have before the machine is read: root's, or the one
    a new account gets. (An existing account's home is in /etc/passwd; apply checks it.)"""
    return "/root" if name == "root" else f"{HOME_DIR}/{name}"


@dataclass(frozen=True)
class User:
    """A login. An existing account (root) only gains keys and groups; others are created."""

    name: str
    ssh_authorized_keys: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()  # supplementary groups; they must exist on the image
    password_hash: str | None = None  # crypt(3) hash; None leaves the account without a password
    # Where in the config the entry came from, for messages ("passwd.users[0]").
    where: str = field(default="", compare=False)


@dataclass(frozen=True)
class File:
    path: str  # absolute, normalised, under WRITABLE_ROOTS
    contents: bytes
    mode: int = 0o644
    # False: an existing file at `path` is an error (Ignition's default); True: replace it.
    overwrite: bool = False
    # Append to an existing file (cloud-config `append: true`, Ignition `append`).
    append: bool = False
    where: str = field(default="", compare=False)


@dataclass(frozen=True)
class Directory:
    path: str
    mode: int = 0o755
    where: str = field(default="", compare=False)


@dataclass(frozen=True)
class Link:
    path: str
    target: str
    hard: bool = False
    overwrite: bool = False
    where: str = field(default="", compare=False)


@dataclass(frozen=True)
class Dropin:
    name: str  # "10-env.conf"
    contents: str


@dataclass(frozen=True)
class Unit:
    """A systemd unit or quadlet file (`.container`, `.volume`, `.network`, ...).

    `contents` None changes only state (enable, mask) or adds drop-ins to a unit the image ships.
    Units go to /etc/systemd/system; quadlet files to /etc/containers/systemd.
    """

    name: str
    contents: str | None = None
    enabled: bool | None = None  # None: leave as the image has it
    mask: bool = False
    dropins: tuple[Dropin, ...] = ()
    where: str = field(default="", compare=False)


@dataclass(frozen=True)
class Command:
    """One `runcmd` entry: an argv run directly, or a string run by /bin/sh -c."""

    argv: tuple[str, ...] = ()
    shell: str | None = None


@dataclass(frozen=True)
class Plan:
    """Everything one config asks for, validated. Applied in this order: hostname, directories,
    files, links, users, units; then commands and the script, once everything else committed.

    No two entries may write one path, nor may one write under a path that another makes a file
    or a link (see `check_collisions`): constructing a Plan checks it, so every parser gets it."""

    source: str  # for messages: "QEMU fw_cfg opt/org.berth/config (Ignition 3.4.0)"
    format: str  # "ignition" | "cloud-config" | "script"
    hostname: str | None = None
    users: tuple[User, ...] = ()
    directories: tuple[Directory, ...] = ()
    files: tuple[File, ...] = ()
    links: tuple[Link, ...] = ()
    units: tuple[Unit, ...] = ()
    commands: tuple[Command, ...] = ()
    script: bytes | None = None  # a user-data that starts with `#!`, run once
    notes: tuple[str, ...] = field(default=())  # things worth telling the operator on the console
    hostname_where: str = field(default="hostname", compare=False)

    def __post_init__(self) -> None:
        check_collisions(self)


class _Claim(StrEnum):
    """What an entry makes of its path. Only a directory may have entries under it."""

    DIRECTORY = "a directory"
    FILE = "a file"
    LINK = "a link"
    KEYS = "a user's authorized_keys"  # merges with a FILE there: the keys are appended


def _claims(plan: Plan) -> Iterator[tuple[str, _Claim, str]]:
    """(path, claim, where) for everything the plan writes that is known before apply."""
    if plan.hostname:
        yield "/etc/hostname", _Claim.FILE, plan.hostname_where
    for directory in plan.directories:
        yield directory.path, _Claim.DIRECTORY, _named(directory.where, directory.path)
    for file in plan.files:
        yield file.path, _Claim.FILE, _named(file.where, file.path)
    for link in plan.links:
        yield link.path, _Claim.LINK, _named(link.where, link.path)
    for unit in plan.units:
        where = _named(unit.where, unit.name)
        path = unit_path(unit.name)
        if unit.mask:
            yield path, _Claim.LINK, where
        elif unit.contents is not None:
            yield path, _Claim.FILE, where
        for k, dropin in enumerate(unit.dropins):
            yield f"{path}.d/{dropin.name}", _Claim.FILE, f"{where}.dropins[{k}]"
    if plan.users:
        where = _named(plan.users[0].where, f"user {plan.users[0].name}")
        for path in ACCOUNT_FILES:
            yield path, _Claim.FILE, f"{where} (accounts are written to {path})"
    for user in plan.users:
        where = _named(user.where, f"user {user.name}")
        home = user_home(user.name)
        if user.name != "root":
            yield home, _Claim.DIRECTORY, f"{where} (its home)"
        if user.ssh_authorized_keys:
            if user.name != "root":
                yield f"{home}/.ssh", _Claim.DIRECTORY, f"{where} (its ~/.ssh)"
            yield f"{home}/.ssh/authorized_keys", _Claim.KEYS, f"{where}.sshAuthorizedKeys"


def _named(where: str, fallback: str) -> str:
    return where or fallback


def check_collisions(plan: Plan) -> None:
    """Refuse two entries that write one path, or one that writes under another's file or link,
    naming both. Paths are compared where they lead once the plan's own symbolic links are
    followed (a file under a link of the plan lands where the link leads). A file and a user's
    SSH keys at one authorized_keys are not a collision: the keys are appended to the file."""
    links = {link.path: link.target for link in plan.links if not link.hard}
    claimed: dict[str, tuple[_Claim, str, str]] = {}  # where it leads -> (claim, where, path)
    for path, claim, where in _claims(plan):
        try:
            found = resolve_in_root(path, links.get, follow=False).path
        except OSError:
            raise field_error(
                plan.source, where, f"links that lead somewhere: {path} loops through them"
            ) from None
        earlier = claimed.get(found)
        if earlier is not None:
            if {earlier[0], claim} == {_Claim.FILE, _Claim.KEYS}:
                continue
            both = f" (both lead to {found})" if (path, earlier[2]) != (found, found) else ""
            raise field_error(
                plan.source,
                where,
                f"a path of its own, but {earlier[1]} writes {earlier[2]} too{both}: "
                "give each path once",
            )
        claimed[found] = (claim, where, path)
    for found, (_, where, _) in claimed.items():
        parent = posixpath.dirname(found)
        while parent != "/":
            above = claimed.get(parent)
            if above is not None and above[0] is not _Claim.DIRECTORY:
                raise field_error(
                    plan.source,
                    where,
                    f"a path whose parents are directories, but {above[1]} makes {parent} "
                    f"{above[0].value}",
                )
            parent = posixpath.dirname(parent)


def in_writable_roots(path: str) -> bool:
    """Whether a normalised absolute path is one of WRITABLE_ROOTS or under one."""
    return any(path == r or path.startswith(r + "/") for r in WRITABLE_ROOTS)


def check_path(source: str, where: str, path: object) -> str:
    """An absolute, normalised path under WRITABLE_ROOTS (no `..`, no `//`, no trailing `/`)."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise field_error(source, where, "an absolute path", path)
    parts = path.split("/")[1:]
    if any(p in ("", ".", "..") for p in parts) or "\0" in path:
        raise field_error(source, where, "a normalised absolute path (no '.', '..' or '//')", path)
    if not in_writable_roots(path):
        raise field_error(
            source,
            where,
            "a path under " + ", ".join(WRITABLE_ROOTS) + " (the rest of the root is the "
            "read-only image)",
            path,
        )
    if len(path.encode()) >= PATH_MAX or any(len(p.encode()) > NAME_MAX for p in parts):
        # Refused here, by its field, rather than as ENAMETOOLONG halfway through staging.
        raise field_error(
            source,
            where,
            f"a path shorter than {PATH_MAX} bytes, each name at most {NAME_MAX}",
            path,
        )
    return path


def add_user_keys(plan: Plan | None, name: str, keys: tuple[str, ...], source: str) -> Plan:
    """`plan` with `keys` (a cloud's key pair) also given to the user `name`, after the keys the
    config gives that user; a plan of that alone when there is no config."""
    if plan is None:
        return Plan(source=source, format="ssh-keys", users=(User(name, keys, where=source),))
    users = list(plan.users)
    for i, user in enumerate(users):
        if user.name == name:
            merged = tuple(dict.fromkeys((*user.ssh_authorized_keys, *keys)))
            users[i] = replace(user, ssh_authorized_keys=merged)
            break
    else:
        users.append(User(name, keys, where=source))
    note = f"{len(keys)} SSH key(s) for {name} from {source}"
    return replace(plan, users=tuple(users), notes=(*plan.notes, note))
