"""What a first-boot config asks the machine to do, whichever format it came in.

Ignition and cloud-config are parsed into the same `Plan`, so that one applier stages and commits
both, and "nothing half-applied" is proven once. Every parser error is a `ProvisionError` whose
message names the config's source, the field (as a path such as `storage.files[2].mode`) and what
was expected: the operator reads it on the serial console of a machine that cannot be logged in to.

Standard library only: the parsers, the sources and the applier all import this.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Where provisioning may write: the rest of the tree is the read-only, verity-protected image
# (`/usr`, `/bin`, ...) or volatile (`/run`, `/tmp`), where a file would silently vanish.
WRITABLE_ROOTS = ("/etc", "/var", "/home", "/root")

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


def unsupported(source: str, path: str, what: str = "") -> ProvisionError:
    """A field Berth does not implement: refused by name, never silently ignored."""
    detail = f" ({what})" if what else ""
    return ProvisionError(f"{source}: {path}: not supported by Berth{detail}")


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


def check_path(source: str, where: str, path: object) -> str:
    """An absolute, normalised path under WRITABLE_ROOTS (no `..`, no `//`, no trailing `/`)."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise field_error(source, where, "an absolute path", path)
    parts = path.split("/")[1:]
    if any(p in ("", ".", "..") for p in parts) or "\0" in path:
        raise field_error(source, where, "a normalised absolute path (no '.', '..' or '//')", path)
    if not any(path == r or path.startswith(r + "/") for r in WRITABLE_ROOTS):
        raise field_error(
            source,
            where,
            "a path under " + ", ".join(WRITABLE_ROOTS) + " (the rest of the root is the "
            "read-only image)",
            path,
        )
    return path
