"""What a first-boot config asks the machine to do, whichever format it came in.

Ignition and cloud-config are parsed into the same `Plan`, so that one applier stages and commits
both, and "nothing half-applied" is proven once. Every parser error is a `ProvisionError` whose
message names the config's source, the field (as a path such as `storage.files[2].mode`) and what
was expected: the operator reads it on the serial console of a machine that cannot be logged in to.

Standard library only: the parsers, the sources and the applier all import this.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

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

# useradd's rule (Debian's default NAME_REGEX without the `$` machine-account suffix).
USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
HOSTNAME = re.compile(r"(?=.{1,64}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
UNIT_NAME = re.compile(
    r"[A-Za-z0-9:_.\\@-]+\.(service|socket|target|timer|path|mount|automount|swap|slice|scope"
    r"|device|container|volume|network|kube|pod|image|build)"
)


class ProvisionError(Exception):
    """A config cannot be found, read, understood or applied. Nothing has been changed."""


def field_error(source: str, path: str, expected: str, got: object = None) -> ProvisionError:
    """`<source>: <path>: expected <expected>[, got <got>]` — the one shape of a config error."""
    message = f"{source}: {path}: expected {expected}"
    if got is not None:
        shown = repr(got)
        message += f", got {shown if len(shown) <= 80 else shown[:77] + '...'}"
    return ProvisionError(message)


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(doc: object, source: str) -> None:
    """Refuse a lone surrogate anywhere in a parsed config: a JSON or YAML "\\ud800" escape
    decodes to one, it is no character, and every path, key, unit or file made of it would fail
    only when written (PyYAML does not even pair two escapes into one character)."""
    pending: list[tuple[str, object]] = [("", doc)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, str) and _SURROGATE.search(value):
            raise field_error(source, path or "(top level)", "text without lone surrogates")
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and _SURROGATE.search(key):
                    raise field_error(
                        source, path or "(top level)", "keys without lone surrogates", key
                    )
                pending.append((f"{path}.{key}" if path else str(key), item))
        elif isinstance(value, list):
            pending.extend((f"{path}[{index}]", item) for index, item in enumerate(value))


def unsupported(source: str, path: str, what: str = "") -> ProvisionError:
    """A field Berth does not implement: refused by name, never silently ignored."""
    detail = f" ({what})" if what else ""
    return ProvisionError(f"{source}: {path}: not supported by Berth{detail}")


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


@dataclass(frozen=True)
class User:
    """A login. An existing account (root) only gains keys and groups; others are created."""

    name: str
    ssh_authorized_keys: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()  # supplementary groups; they must exist on the image
    password_hash: str | None = None  # crypt(3) hash; None leaves the account without a password


@dataclass(frozen=True)
class File:
    path: str  # absolute, normalised, under WRITABLE_ROOTS
    contents: bytes
    mode: int = 0o644
    # False: an existing file at `path` is an error (Ignition's default); True: replace it.
    overwrite: bool = False
    # Append to an existing file (cloud-config `append: true`, Ignition `append`).
    append: bool = False


@dataclass(frozen=True)
class Directory:
    path: str
    mode: int = 0o755


@dataclass(frozen=True)
class Link:
    path: str
    target: str
    hard: bool = False
    overwrite: bool = False


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


@dataclass(frozen=True)
class Command:
    """One `runcmd` entry: an argv run directly, or a string run by /bin/sh -c."""

    argv: tuple[str, ...] = ()
    shell: str | None = None


@dataclass(frozen=True)
class Plan:
    """Everything one config asks for, validated. Applied in this order: hostname, directories,
    files, links, users, units; then commands and the script, once everything else committed."""

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
    return path
