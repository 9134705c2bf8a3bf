"""Read an Ignition config (spec 3.0.0 to 3.4.0) into a provisioning `Plan`.

Ignition is the first-boot format of Fedora CoreOS, Flatcar and RHCOS: JSON, usually compiled from
a Butane YAML file. Berth implements the part of it that makes sense on a host whose root is a
read-only image: users and their SSH keys; files, directories and links under /etc, /var, /home and
/root; systemd units and their drop-ins (quadlet files too). Everything else the spec has (disks,
RAID, LUKS, filesystems, kernel arguments, merged configs, owners other than root, ...) is refused
by its field path as soon as a config asks for it, so a config never half-works. An empty value
asks for nothing and passes: Butane writes `{}` and `null` for everything left out.

Two passes. `_SCHEMA` is the spec's field tree, each field marked with the version that introduced
it and whether Berth implements it; walking it first reports unknown keys, wrong types, fields too
new for the declared version and unsupported fields. The second checks values (paths, modes, names,
hashes, URLs) and turns the supported fields into plan entries. Only a config found sound in
every part has its contents decoded from `data:` URLs and fetched from http(s) ones, through a
`Fetcher` (`http_fetch` unless the caller passes another).

Two mappings are Berth's own, not Ignition's:
- A file's `append` list is folded into one `File`. With `contents.source`, the result is the
  contents followed by every append, written as one file. Without it (Ignition: "make sure the file
  exists, then append"), the result is one `File(append=True)` holding the appends in order.
- A file at /etc/hostname holding one valid host name becomes `Plan.hostname`, so the name is set
  on the running machine during first boot as well as written to /etc/hostname.

Runs on the device: standard library and python3-requests (imported only to fetch).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from updater.provision import http
from updater.provision.plan import (
    HOSTNAME,
    MAX_DECOMPRESSED,
    UNIT_NAME,
    USER_NAME,
    Directory,
    Dropin,
    File,
    Link,
    MiB,
    Plan,
    ProvisionError,
    Unit,
    User,
    check_path,
    check_plan_contents,
    check_text,
    field_error,
    gunzip,
    unsupported,
)

if TYPE_CHECKING:
    import requests

SPEC_VERSIONS = ("3.0.0", "3.1.0", "3.2.0", "3.3.0", "3.4.0")

# One file's contents, fetched or decompressed: the whole plan is held in memory before anything
# is written, and a config that wants more than this on /etc is a mistake. The same number as the
# decompression cap, so that a file's limit does not depend on how it arrives.
MAX_CONTENTS = MAX_DECOMPRESSED

# Statuses worth asking again for: the server (often the platform's metadata service) is
# starting or overloaded. Anything else will not change within one boot.
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})

_HASH = re.compile(r"(sha256|sha512)-([0-9a-fA-F]+)")
_HASH_HEX_LENGTH = {"sha256": 64, "sha512": 128}
# RFC 7230 token: what an HTTP header name may be.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Schemes Ignition fetches from that Berth does not, with the spec version that introduced them.
_OTHER_SCHEMES = {"tftp": "3.0.0", "s3": "3.0.0", "gs": "3.2.0", "arn": "3.4.0"}
_DEFAULT_FILE_MODE = 0o644
_DEFAULT_DIRECTORY_MODE = 0o755


class Fetcher(Protocol):
    """Gets the bytes at an http(s) URL, sending `headers`; raises ProvisionError naming the URL.

    Retrying is the fetcher's business: the parser calls it once per source.
    """

    def __call__(self, url: str, headers: Mapping[str, str], /) -> bytes: ...


# --- The spec ----------------------------------------------------------------------------------


class _Kind(StrEnum):
    OBJECT = "an object"
    LIST = "a list"
    STRING = "a string"
    INTEGER = "an integer"
    BOOLEAN = "a boolean"


@dataclass(frozen=True)
class _Spec:
    """One field of the spec: its JSON type and, for Berth, whether it is implemented."""

    kind: _Kind
    fields: Mapping[str, _Spec] = field(default_factory=dict)  # OBJECT: the keys it may have
    item: _Spec | None = None  # LIST: each item; None for lists refused whenever non-empty
    since: str = "3.0.0"
    supported: bool = True
    # For an unsupported field: the value that asks for nothing (beyond null, "", false, [], {}).
    default: object = None
    expect: str = ""  # what the type error says is expected, when the kind alone is too terse
    why: str = ""  # for an unsupported field: why Berth does not do it, or what to do instead


def _string(*, since: str = "3.0.0") -> _Spec:
    return _Spec(_Kind.STRING, since=since)


def _integer(*, expect: str = "", default: object = None) -> _Spec:
    return _Spec(_Kind.INTEGER, expect=expect, default=default)


def _boolean(*, default: object = None) -> _Spec:
    return _Spec(_Kind.BOOLEAN, default=default)


def _object(fields: Mapping[str, _Spec], *, since: str = "3.0.0") -> _Spec:
    return _Spec(_Kind.OBJECT, fields=fields, since=since)


def _list(item: _Spec | None, *, since: str = "3.0.0") -> _Spec:
    return _Spec(_Kind.LIST, item=item, since=since)


def _refused(spec: _Spec, why: str) -> _Spec:
    return replace(spec, supported=False, why=why)


def _resource(*, compression_since: str = "3.0.0") -> _Spec:
    return _object(
        {
            "source": _string(),
            "compression": _string(since=compression_since),
            "httpHeaders": _list(_object({"name": _string(), "value": _string()}), since="3.1.0"),
            "verification": _object({"hash": _string()}),
        }
    )


_ROOT_OWNS = "everything provisioning writes belongs to root"
_OWNER = _object(
    {
        "id": _refused(_integer(default=0), _ROOT_OWNS),
        "name": _refused(_Spec(_Kind.STRING, default="root"), _ROOT_OWNS),
    }
)
_MODE_FILE = _integer(expect="an integer (decimal, e.g. 420 for 0644)")
_MODE_DIRECTORY = _integer(expect="an integer (decimal, e.g. 493 for 0755)")
_USER_DEFAULTS = "Berth creates accounts with the image's defaults"
_DISKS = "the disk layout is the image's: /var grows to fill the disk on first boot"
_FETCHING = "Berth fetches with its own timeouts and retries, without a proxy"

_SCHEMA = _object(
    {
        "ignition": _object(
            {
                "version": _string(),
                "config": _object(
                    {
                        "merge": _refused(
                            _list(None), "Berth reads one config: merge the others into it"
                        ),
                        "replace": _refused(
                            _resource(compression_since="3.1.0"),
                            "Berth reads one config: give it the replacement directly",
                        ),
                    }
                ),
                "timeouts": _object(
                    {
                        "httpResponseHeaders": _refused(_integer(default=10), _FETCHING),
                        "httpTotal": _refused(_integer(default=0), _FETCHING),
                    }
                ),
                "security": _object(
                    {
                        "tls": _object(
                            {
                                "certificateAuthorities": _refused(
                                    _list(None),
                                    "https sources are checked against the image's CA certificates",
                                )
                            }
                        )
                    }
                ),
                "proxy": _object(
                    {
                        "httpProxy": _refused(_string(), _FETCHING),
                        "httpsProxy": _refused(_string(), _FETCHING),
                        "noProxy": _refused(_list(_string()), _FETCHING),
                    },
                    since="3.1.0",
                ),
            }
        ),
        "storage": _object(
            {
                "disks": _refused(_list(None), _DISKS),
                "raid": _refused(_list(None), _DISKS),
                "filesystems": _refused(_list(None), _DISKS),
                "luks": _refused(_list(None, since="3.2.0"), _DISKS),
                "files": _list(
                    _object(
                        {
                            "path": _string(),
                            "overwrite": _boolean(),
                            "mode": _MODE_FILE,
                            "contents": _resource(),
                            "append": _list(_resource()),
                            "user": _OWNER,
                            "group": _OWNER,
                        }
                    )
                ),
                "directories": _list(
                    _object(
                        {
                            "path": _string(),
                            "overwrite": _refused(
                                _boolean(),
                                "Berth does not replace what is at a path by a directory",
                            ),
                            "mode": _MODE_DIRECTORY,
                            "user": _OWNER,
                            "group": _OWNER,
                        }
                    )
                ),
                "links": _list(
                    _object(
                        {
                            "path": _string(),
                            "overwrite": _boolean(),
                            "target": _string(),
                            "hard": _boolean(),
                            "user": _OWNER,
                            "group": _OWNER,
                        }
                    )
                ),
            }
        ),
        "systemd": _object(
            {
                "units": _list(
                    _object(
                        {
                            "name": _string(),
                            "enabled": _boolean(),
                            "mask": _boolean(),
                            "contents": _string(),
                            "dropins": _list(_object({"name": _string(), "contents": _string()})),
                        }
                    )
                )
            }
        ),
        "passwd": _object(
            {
                "users": _list(
                    _object(
                        {
                            "name": _string(),
                            "passwordHash": _string(),
                            "sshAuthorizedKeys": _list(_string()),
                            "groups": _list(_string()),
                            "uid": _refused(_integer(), _USER_DEFAULTS),
                            "gecos": _refused(_string(), _USER_DEFAULTS),
                            "homeDir": _refused(_string(), _USER_DEFAULTS),
                            "noCreateHome": _refused(_boolean(), _USER_DEFAULTS),
                            "primaryGroup": _refused(_string(), _USER_DEFAULTS),
                            "noUserGroup": _refused(_boolean(), _USER_DEFAULTS),
                            "noLogInit": _refused(_boolean(), _USER_DEFAULTS),
                            "shell": _refused(_string(), _USER_DEFAULTS),
                            "system": _refused(_boolean(), _USER_DEFAULTS),
                            "shouldExist": replace(
                                _refused(_boolean(default=True), "Berth does not delete accounts"),
                                since="3.2.0",
                            ),
                        }
                    )
                ),
                "groups": _refused(
                    _list(None),
                    "the image's groups are the ones there are: add users to them with "
                    "passwd.users[].groups",
                ),
            }
        ),
        "kernelArguments": _refused(
            _object(
                {"shouldExist": _list(_string()), "shouldNotExist": _list(_string())},
                since="3.3.0",
            ),
            "the kernel command line is part of the signed boot image",
        ),
    }
)


# --- Parsing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    source: str  # "<where the config came from> (Ignition <version>)", for messages
    version: str
    fetch: Fetcher
    notes: list[str] = field(default_factory=list)

    def newer(self, since: str) -> bool:
        return SPEC_VERSIONS.index(since) > SPEC_VERSIONS.index(self.version)


class _Shown:
    """A config value as its JSON, for messages: the operator wrote `true` and `"0644"`."""

    def __init__(self, value: object) -> None:
        self.value = value

    def __repr__(self) -> str:
        return json.dumps(self.value, ensure_ascii=False)


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Go's decoder keeps the last of two equal keys; refusing is kinder than guessing which one
    # the operator meant.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _load_json(data: bytes, source: str) -> object:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ProvisionError(f"{source}: not UTF-8 text (at byte {e.start})") from e
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except _DuplicateKey as e:
        raise ProvisionError(f"{source}: a JSON object has the key {_Shown(str(e))!r} twice") from e
    except json.JSONDecodeError as e:
        hint = ""
        if re.search(r"^variant:", text, re.MULTILINE):
            hint = " (this looks like a Butane config: compile it to Ignition with `butane`)"
        raise ProvisionError(
            f"{source}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}{hint}"
        ) from e
    except ValueError as e:
        raise ProvisionError(f"{source}: not valid JSON: {e}") from e
    except RecursionError as e:
        raise ProvisionError(f"{source}: not valid JSON: nested too deeply") from e


def _spec_version(config: object, source: str) -> str:
    if not isinstance(config, dict):
        raise field_error(
            source, "(top level)", "a JSON object (an Ignition config)", _Shown(config)
        )
    if "ignitionVersion" in config:
        raise _old_spec(source, "1")
    ignition = config.get("ignition")
    if not isinstance(ignition, dict) or "version" not in ignition:
        raise field_error(source, "ignition.version", 'the spec version, such as "3.4.0"')
    version = ignition["version"]
    if not isinstance(version, str):
        raise field_error(source, "ignition.version", "a string", _Shown(version))
    if version in SPEC_VERSIONS:
        return version
    if re.match(r"[12]\.", version):
        raise _old_spec(source, version)
    raise field_error(
        source,
        "ignition.version",
        f"one of {', '.join(SPEC_VERSIONS)} (Berth reads up to spec 3.4.0: with Butane, a "
        "fcos 1.5.0 config compiles to it)",
        _Shown(version),
    )


def _old_spec(source: str, version: str) -> ProvisionError:
    return ProvisionError(
        f"{source}: ignition.version: Ignition spec {version} is not supported: Berth reads spec 3 "
        f"({SPEC_VERSIONS[0]} to {SPEC_VERSIONS[-1]}). Translate the config to spec 3: rewrite it "
        "as a Butane config and compile it with `butane`, or convert it with `ign-converter`."
    )


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _asks_for_something(spec: _Spec | None, value: object) -> bool:
    """Whether a value would make Ignition do something (so that refusing it matters)."""
    if value is None or value == "" or value == [] or value == {}:
        return False
    if spec is not None and spec.default is not None:
        return not (type(value) is type(spec.default) and value == spec.default)
    if isinstance(value, bool):
        return value  # every boolean Berth refuses defaults to false
    if isinstance(value, dict):
        fields = spec.fields if spec is not None else {}
        return any(_asks_for_something(fields.get(k), v) for k, v in value.items())
    return True


def _check(ctx: _Context, spec: _Spec, value: object, path: str) -> None:
    """Types, known keys, versions and Berth's refusals, everywhere under `path`."""
    if spec.kind is _Kind.OBJECT:
        if not isinstance(value, dict):
            raise field_error(ctx.source, path, spec.expect or spec.kind.value, _Shown(value))
        for key, child_value in value.items():
            child_path = _join(path, key)
            child = spec.fields.get(key)
            if child is None:
                allowed = sorted(k for k, s in spec.fields.items() if not ctx.newer(s.since))
                raise field_error(
                    ctx.source,
                    path or "(top level)",
                    "only the keys " + ", ".join(allowed),
                    _Shown(key),
                )
            if ctx.newer(child.since):
                raise field_error(
                    ctx.source,
                    child_path,
                    f"a config of spec {child.since} or later (the field is new in "
                    f"{child.since}; this config declares {ctx.version})",
                )
            if child_value is None:
                continue  # null is how Ignition's own tools write "not set"
            if not child.supported and _asks_for_something(child, child_value):
                raise unsupported(ctx.source, child_path, child.why)
            _check(ctx, child, child_value, child_path)
    elif spec.kind is _Kind.LIST:
        if not isinstance(value, list):
            raise field_error(ctx.source, path, spec.expect or spec.kind.value, _Shown(value))
        if spec.item is not None:
            for i, item in enumerate(value):
                if item is None:
                    raise field_error(
                        ctx.source, f"{path}[{i}]", f"{spec.item.kind.value}, not null"
                    )
                _check(ctx, spec.item, item, f"{path}[{i}]")
    else:
        ok = {
            _Kind.STRING: isinstance(value, str),
            _Kind.INTEGER: isinstance(value, int) and not isinstance(value, bool),
            _Kind.BOOLEAN: isinstance(value, bool),
        }[spec.kind]
        if not ok:
            raise field_error(ctx.source, path, spec.expect or spec.kind.value, _Shown(value))


def parse_ignition(data: bytes, source: str, *, fetch: Fetcher | None = None) -> Plan:
    """Validate an Ignition config and fetch what it refers to; raise ProvisionError on any fault.

    `source` says where the config came from, for messages ("QEMU fw_cfg opt/org.berth/config").
    Nothing on the machine is touched; http(s) contents are fetched with `fetch` (default
    `http_fetch`), so a config that parses is complete.
    """
    config = _load_json(data, source)
    check_text(config, source)
    version = _spec_version(config, source)
    ctx = _Context(f"{source} (Ignition {version})", version, fetch or http_fetch)
    _check(ctx, _SCHEMA, config, "")
    assert isinstance(config, dict)

    storage = config.get("storage") or {}
    passwd = config.get("passwd") or {}
    systemd = config.get("systemd") or {}
    seen_paths: dict[str, str] = {}
    pending = _check_files(ctx, _entries(storage, "files"), seen_paths)
    directories = _directories(ctx, _entries(storage, "directories"), seen_paths)
    links = _links(ctx, _entries(storage, "links"), seen_paths)
    users = _users(ctx, _entries(passwd, "users"))
    units = _units(ctx, _entries(systemd, "units"))
    # Only now, with the whole config found sound, does anything go over the network.
    hostname, files = _load_files(ctx, pending)
    return Plan(
        source=ctx.source,
        format="ignition",
        hostname=hostname,
        users=users,
        directories=directories,
        files=files,
        links=links,
        units=units,
        notes=tuple(ctx.notes),
    )


def _entries(parent: dict[str, Any], key: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = parent.get(key) or []
    return entries


def _strings(parent: dict[str, Any], key: str) -> list[str]:
    values: list[str] = parent.get(key) or []
    return values


def _claim_path(ctx: _Context, seen: dict[str, str], path: str, where: str) -> None:
    # Ignition's rule: a path is one file, directory or link, never two entries.
    if path in seen:
        raise field_error(
            ctx.source, f"{where}.path", f"a path not already used by {seen[path]}", _Shown(path)
        )
    seen[path] = where


def _mode(ctx: _Context, entry: dict[str, Any], where: str, default: int) -> int:
    mode = entry.get("mode")
    if mode is None:
        return default
    assert isinstance(mode, int)
    if not 0 <= mode <= 0o7777:
        raise field_error(
            ctx.source,
            f"{where}.mode",
            "a permission mode between 0 and 4095 (07777), in decimal",
            _Shown(mode),
        )
    if mode & 0o7000:
        # Ignition before spec 3.6.0 drops these bits silently; Berth neither drops nor guesses.
        raise unsupported(
            ctx.source,
            f"{where}.mode",
            f"setuid, setgid and sticky bits (mode {mode} is 0{mode:o}): Ignition specs before "
            "3.6.0 ignore them",
        )
    return mode


@dataclass(frozen=True)
class _Resource:
    """A contents/append object, checked; `_load` turns it into bytes (fetching if need be)."""

    where: str  # "storage.files[2].append[0]"
    source: str
    scheme: str
    gzip: bool
    headers: Mapping[str, str]
    expected: tuple[str, str] | None  # (algorithm, hex digest) of the decompressed bytes


@dataclass(frozen=True)
class _PendingFile:
    where: str
    path: str
    mode: int
    overwrite: bool
    contents: _Resource | None  # None: no source (make sure the file exists, then append)
    append: tuple[_Resource, ...]


def _check_files(
    ctx: _Context, entries: list[dict[str, Any]], seen: dict[str, str]
) -> list[_PendingFile]:
    pending: list[_PendingFile] = []
    for i, entry in enumerate(entries):
        where = f"storage.files[{i}]"
        path = check_path(ctx.source, f"{where}.path", entry.get("path"))
        _claim_path(ctx, seen, path, where)
        mode = _mode(ctx, entry, where, _DEFAULT_FILE_MODE)
        overwrite = entry.get("overwrite") is True
        contents: dict[str, Any] = entry.get("contents") or {}
        if contents.get("source") is None:
            if overwrite:
                raise field_error(
                    ctx.source,
                    f"{where}.contents.source",
                    "a source when overwrite is true (the file is replaced by these contents)",
                )
            if _asks_for_something(None, contents):
                raise field_error(
                    ctx.source,
                    f"{where}.contents.source",
                    "a source for the compression, verification or httpHeaders given",
                )
        append: list[_Resource] = []
        for k, extra in enumerate(_entries(entry, "append")):
            if extra.get("source") is None:
                raise field_error(ctx.source, f"{where}.append[{k}].source", "a URL to append")
            append.append(_check_resource(ctx, extra, f"{where}.append[{k}]"))
        base = (
            _check_resource(ctx, contents, f"{where}.contents")
            if contents.get("source") is not None
            else None
        )
        pending.append(_PendingFile(where, path, mode, overwrite, base, tuple(append)))
    return pending


def _load_files(ctx: _Context, pending: list[_PendingFile]) -> tuple[str | None, tuple[File, ...]]:
    hostname: str | None = None
    files: list[File] = []
    total = 0

    def load(resource: _Resource) -> bytes:
        # Counted as each source is decoded, so that memory stays bounded while loading.
        nonlocal total
        data = _load(ctx, resource)
        total += len(data)
        check_plan_contents(ctx.source, resource.where, total)
        return data

    for entry in pending:
        appended = b"".join(load(r) for r in entry.append)
        if entry.contents is None:
            # Ignition: create the file if it is missing, then append. `append=True` says the same.
            files.append(File(entry.path, appended, entry.mode, overwrite=False, append=True))
            continue
        data = load(entry.contents) + appended
        name = _hostname(data) if entry.path == "/etc/hostname" else None
        if name is not None:
            hostname = name
            ctx.notes.append(f"{entry.where}: /etc/hostname sets the host name {name}")
            continue
        if len(data) > MAX_CONTENTS:
            raise field_error(
                ctx.source, entry.where, f"at most {MAX_CONTENTS // MiB} MiB of contents", len(data)
            )
        files.append(File(entry.path, data, entry.mode, overwrite=entry.overwrite))
    return hostname, tuple(files)


def _hostname(data: bytes) -> str | None:
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    return text if HOSTNAME.fullmatch(text) else None


def _directories(
    ctx: _Context, entries: list[dict[str, Any]], seen: dict[str, str]
) -> tuple[Directory, ...]:
    directories: list[Directory] = []
    for i, entry in enumerate(entries):
        where = f"storage.directories[{i}]"
        path = check_path(ctx.source, f"{where}.path", entry.get("path"))
        _claim_path(ctx, seen, path, where)
        directories.append(Directory(path, _mode(ctx, entry, where, _DEFAULT_DIRECTORY_MODE)))
    return tuple(directories)


def _links(ctx: _Context, entries: list[dict[str, Any]], seen: dict[str, str]) -> tuple[Link, ...]:
    links: list[Link] = []
    for i, entry in enumerate(entries):
        where = f"storage.links[{i}]"
        path = check_path(ctx.source, f"{where}.path", entry.get("path"))
        _claim_path(ctx, seen, path, where)
        hard = entry.get("hard") is True
        target = entry.get("target")
        if hard:
            # A hard link names an existing file that provisioning may touch.
            target = check_path(ctx.source, f"{where}.target", target)
        elif not isinstance(target, str) or not target or "\0" in target:
            raise field_error(
                ctx.source, f"{where}.target", "the path the link points to", _Shown(target)
            )
        links.append(Link(path, target, hard=hard, overwrite=entry.get("overwrite") is True))
    return tuple(links)


def _users(ctx: _Context, entries: list[dict[str, Any]]) -> tuple[User, ...]:
    users: list[User] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        where = f"passwd.users[{i}]"
        name = entry.get("name")
        if name is None:
            raise field_error(ctx.source, f"{where}.name", "a user name")
        assert isinstance(name, str)
        if not USER_NAME.fullmatch(name):
            raise field_error(
                ctx.source,
                f"{where}.name",
                "a user name: a lower-case letter or '_', then up to 31 lower-case letters, "
                "digits, '_' or '-'",
                _Shown(name),
            )
        if name in seen:
            raise field_error(
                ctx.source,
                f"{where}.name",
                f"a name not already used by passwd.users[{seen[name]}]",
                _Shown(name),
            )
        seen[name] = i
        keys = _strings(entry, "sshAuthorizedKeys")
        for k, key in enumerate(keys):
            # One key is one line of authorized_keys: a line break would smuggle in another.
            if not key.strip() or "\n" in key or "\r" in key or "\0" in key:
                raise field_error(
                    ctx.source,
                    f"{where}.sshAuthorizedKeys[{k}]",
                    "one public key on one line",
                    _Shown(key),
                )
            if key in keys[:k]:
                raise field_error(
                    ctx.source,
                    f"{where}.sshAuthorizedKeys[{k}]",
                    f"a key not already given as sshAuthorizedKeys[{keys.index(key)}]",
                )
        groups = _strings(entry, "groups")
        for k, group in enumerate(groups):
            if not USER_NAME.fullmatch(group):
                raise field_error(ctx.source, f"{where}.groups[{k}]", "a group name", _Shown(group))
        password_hash = entry.get("passwordHash")
        if password_hash is not None:
            assert isinstance(password_hash, str)
            if not password_hash or any(c in password_hash for c in ":\n\r\0"):
                raise field_error(
                    ctx.source,
                    f"{where}.passwordHash",
                    "a crypt(3) hash such as the output of `mkpasswd` (an empty one would let "
                    "anyone log in)",
                    _Shown(password_hash),
                )
        users.append(User(name, tuple(keys), tuple(groups), password_hash))
    return tuple(users)


def _units(ctx: _Context, entries: list[dict[str, Any]]) -> tuple[Unit, ...]:
    units: list[Unit] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        where = f"systemd.units[{i}]"
        name = entry.get("name")
        if name is None:
            raise field_error(ctx.source, f"{where}.name", "a unit name")
        assert isinstance(name, str)
        if not UNIT_NAME.fullmatch(name):
            raise field_error(
                ctx.source,
                f"{where}.name",
                "a unit name with a systemd type (.service, .timer, ...) or a quadlet type "
                "(.container, .volume, ...)",
                _Shown(name),
            )
        if name in seen:
            raise field_error(
                ctx.source,
                f"{where}.name",
                f"a name not already used by systemd.units[{seen[name]}]",
                _Shown(name),
            )
        seen[name] = i
        contents = entry.get("contents")
        if contents is not None:
            _check_text(ctx, contents, f"{where}.contents")
        dropins: list[Dropin] = []
        for k, dropin in enumerate(_entries(entry, "dropins")):
            dropin_name = dropin.get("name")
            if (
                not isinstance(dropin_name, str)
                or not dropin_name.endswith(".conf")
                or dropin_name == ".conf"
                or "/" in dropin_name
                or "\0" in dropin_name
            ):
                raise field_error(
                    ctx.source,
                    f"{where}.dropins[{k}].name",
                    'a file name ending in ".conf"',
                    _Shown(dropin_name),
                )
            if any(d.name == dropin_name for d in dropins):
                raise field_error(
                    ctx.source,
                    f"{where}.dropins[{k}].name",
                    "a name no other drop-in of this unit has",
                    _Shown(dropin_name),
                )
            text = dropin.get("contents") or ""
            _check_text(ctx, text, f"{where}.dropins[{k}].contents")
            dropins.append(Dropin(dropin_name, text))
        units.append(
            Unit(
                name,
                contents=contents,
                enabled=entry.get("enabled"),
                mask=entry.get("mask") is True,
                dropins=tuple(dropins),
            )
        )
    return tuple(units)


def _check_text(ctx: _Context, text: str, where: str) -> None:
    if "\0" in text:
        raise field_error(ctx.source, where, "text without NUL characters")


# --- Contents ----------------------------------------------------------------------------------


def _check_resource(ctx: _Context, resource: dict[str, Any], where: str) -> _Resource:
    source: str = resource["source"]
    compression = resource.get("compression") or ""
    if compression not in ("", "gzip"):
        raise field_error(
            ctx.source, f"{where}.compression", '"gzip" or nothing', _Shown(compression)
        )
    expected = _expected_hash(ctx, resource, where)
    try:
        parts = urllib.parse.urlsplit(source)
        host = parts.hostname
    except ValueError as e:
        raise field_error(ctx.source, f"{where}.source", f"a URL ({e})", _Shown(source)) from e
    scheme = parts.scheme.lower()
    headers = _headers(ctx, resource, where, scheme)
    if source == "" or scheme == "data":
        pass
    elif scheme in ("http", "https"):
        if not host:
            raise field_error(
                ctx.source, f"{where}.source", "an http(s) URL with a host", _Shown(source)
            )
    elif scheme in _OTHER_SCHEMES and not ctx.newer(_OTHER_SCHEMES[scheme]):
        raise unsupported(
            ctx.source, f"{where}.source", f"{scheme}: URLs; use a data:, http: or https: URL"
        )
    else:
        raise field_error(
            ctx.source, f"{where}.source", "a data:, http: or https: URL", _Shown(source)
        )
    return _Resource(where, source, scheme, compression == "gzip", headers, expected)


def _load(ctx: _Context, resource: _Resource) -> bytes:
    """The bytes a resource stands for: decoded or fetched, decompressed, verified."""
    where, source = resource.where, resource.source
    if source == "":
        raw = b""  # Ignition: an empty source is an empty file
    elif resource.scheme == "data":
        raw = _data_url(ctx, source, f"{where}.source")
    else:
        verified = resource.expected is not None
        raw = _fetch(ctx, source, resource.headers, f"{where}.source", verified=verified)
    data = gunzip(raw, ctx.source, f"{where}.compression") if resource.gzip else raw
    if resource.expected is not None:
        algorithm, digest = resource.expected
        actual = hashlib.new(algorithm, data).hexdigest()
        if actual != digest:
            raise ProvisionError(
                f"{ctx.source}: {where}.verification.hash: the contents of "
                f"{_display_url(source)} hash to {algorithm}-{actual}, the config expects "
                f"{algorithm}-{digest}"
            )
    return data


def _expected_hash(ctx: _Context, resource: dict[str, Any], where: str) -> tuple[str, str] | None:
    verification: dict[str, Any] = resource.get("verification") or {}
    value = verification.get("hash")
    if value is None:
        return None
    assert isinstance(value, str)
    match = _HASH.fullmatch(value)
    types = '"sha512-<hex>"' if ctx.newer("3.1.0") else '"sha256-<hex>" or "sha512-<hex>"'
    if match is None or len(match[2]) != _HASH_HEX_LENGTH[match[1]]:
        raise field_error(ctx.source, f"{where}.verification.hash", types, _Shown(value))
    if match[1] == "sha256" and ctx.newer("3.1.0"):
        raise field_error(
            ctx.source,
            f"{where}.verification.hash",
            f"{types} (sha256 is new in spec 3.1.0)",
            _Shown(value),
        )
    return match[1], match[2].lower()


def _headers(ctx: _Context, resource: dict[str, Any], where: str, scheme: str) -> dict[str, str]:
    entries = _entries(resource, "httpHeaders")
    if entries and scheme not in ("http", "https"):
        raise field_error(
            ctx.source, f"{where}.httpHeaders", "no headers unless the source is an http(s) URL"
        )
    headers: dict[str, str] = {}
    seen: set[str] = set()
    for k, header in enumerate(entries):
        name = header.get("name")
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise field_error(
                ctx.source, f"{where}.httpHeaders[{k}].name", "an HTTP header name", _Shown(name)
            )
        if name.lower() in seen:
            raise field_error(
                ctx.source,
                f"{where}.httpHeaders[{k}].name",
                "a header not already given",
                _Shown(name),
            )
        seen.add(name.lower())
        value = header.get("value")
        if value is None:
            continue  # Ignition: a name without a value removes a header when configs merge
        assert isinstance(value, str)
        if any(c in value for c in "\r\n\0"):
            # Not shown: header values are often credentials.
            raise field_error(
                ctx.source, f"{where}.httpHeaders[{k}].value", "a header value on one line"
            )
        headers[name] = value
    return headers


def _data_url(ctx: _Context, url: str, where: str) -> bytes:
    """RFC 2397: `data:[<media type>][;base64],<data>`; the media type does not matter here."""
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise field_error(
            ctx.source, where, "a data: URL (data:[<media type>][;base64],<data>)", _Shown(url)
        )
    if header.split(";")[-1].strip().lower() == "base64":
        encoded = re.sub(rb"\s+", b"", urllib.parse.unquote_to_bytes(payload))
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as e:
            raise field_error(
                ctx.source, where, f"a data: URL with valid base64 data ({e})", _Shown(url)
            ) from e
    return urllib.parse.unquote_to_bytes(payload)


def _display_url(url: str) -> str:
    """A URL for the console: no password, no query (it often carries a token), data: shortened."""
    if url.lower().startswith("data:"):
        return "the data: URL" if len(url) > 60 else url
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    shown = f"{parts.scheme}://{netloc}{parts.path}"
    return shown + ("?..." if parts.query else "")


def _fetch(
    ctx: _Context, url: str, headers: Mapping[str, str], where: str, *, verified: bool
) -> bytes:
    try:
        data = ctx.fetch(url, headers)
    except ProvisionError as e:
        raise ProvisionError(f"{ctx.source}: {where}: {e}") from e
    if len(data) > MAX_CONTENTS:
        raise ProvisionError(
            f"{ctx.source}: {where}: {_display_url(url)} is {len(data)} bytes, more than "
            f"{MAX_CONTENTS // MiB} MiB"
        )
    if url.lower().startswith("http:") and not verified:
        ctx.notes.append(
            f"{where}: fetched {_display_url(url)} over plain http without verification.hash"
        )
    return data


# --- The default fetcher -----------------------------------------------------------------------


def http_fetch(
    url: str,
    headers: Mapping[str, str],
    *,
    timeout: float = 10.0,
    retry_for: float = 60.0,
    max_bytes: int = MAX_CONTENTS,
) -> bytes:
    """GET `url` with `headers`; raise ProvisionError naming the URL when it cannot be had.

    At first boot the network may still be coming up (no address yet, DNS not answering, the
    metadata service starting), so connection failures, timeouts and 408/429/5xx answers are
    retried with a growing pause until `retry_for` seconds have passed. `timeout` bounds each
    connect and each read; a body over `max_bytes` is refused without reading the rest.
    """
    import requests

    shown = _display_url(url)

    def give_up(last: str, attempts: int) -> ProvisionError:
        return ProvisionError(
            f"{last} (gave up after {attempts} attempt{'s' if attempts > 1 else ''} in "
            f"{retry_for:g} s)"
        )

    with requests.Session() as session:
        session.headers["User-Agent"] = "berth-provision"
        return http.retry_until(
            time.monotonic() + retry_for,
            lambda: _fetch_once(session, url, headers, timeout, max_bytes, shown),
            give_up,
        )


def _fetch_once(
    session: requests.Session,
    url: str,
    headers: Mapping[str, str],
    timeout: float,
    max_bytes: int,
    shown: str,
) -> bytes:
    what = f"fetching {shown}"  # never the URL itself: its query may carry a token
    with (
        http.request_errors(what),
        session.get(url, headers=dict(headers), timeout=timeout, stream=True) as response,
    ):
        status = response.status_code
        if status in _TRANSIENT_STATUS:
            raise http.NotYet(f"{what}: HTTP {status} {response.reason or ''}".rstrip())
        if status != 200:
            raise ProvisionError(f"{what}: HTTP {status} {response.reason or ''}".rstrip())
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise ProvisionError(f"{what}: {length} bytes, more than {max_bytes}")
        body = http.read_capped(response, max_bytes)
        if body is None:
            raise ProvisionError(f"{what}: more than {max_bytes} bytes")
        return body
