"""User-data: tell its kind from its first line, and parse `#cloud-config` and `#!` scripts.

Clouds hand a machine one opaque blob of user-data (EC2, OpenStack and GCE metadata, a NoCloud or
config-2 drive); its first line says what it is. `classify` names the kind, the way cloud-init
does (case-insensitive, leading blank lines ignored; gzip-compressed user-data, which EC2 and
OpenStack allow, is decompressed first). `parse_user_data` turns a cloud-config or a script into a
`Plan` and refuses every other kind by name; an Ignition config (JSON) is recognised here but goes
to `ignition`.

Berth implements the part of cloud-config that makes sense on a read-only, container-only host.
cloud-init logs a warning for what it does not understand and carries on; Berth refuses every
other key by name, so a config never half-works:

- `hostname`, `fqdn`, `preserve_hostname`, `prefer_fqdn_over_hostname` (false only). The
  hostname is one DNS label (`HOSTNAME`): a dotted `hostname` or an `fqdn` sets its first label,
  as cloud-init does unless `prefer_fqdn_over_hostname` is true, which Berth refuses.
  `hostname` wins over `fqdn` when both are given.
- `users`: `default` means root, Berth's only login user, which always exists: nothing to do.
  A plain name creates that user. A mapping takes `name`, `ssh_authorized_keys`, `groups` (a list
  or "a, b"), `passwd` or `hashed_passwd` (a crypt(3) hash) and `lock_passwd` (default true).
  As in cloud-init a locked account keeps its hash behind `!` (`passwd -l`): give
  `lock_passwd: false` to log in with the password. `lock_passwd: false` without a hash is
  refused: it would ask for an unlocked account without a password.
- `ssh_authorized_keys` at the top level: keys for the default user, root (merged with a `root`
  entry in `users`).
- `write_files`: `path` (under `WRITABLE_ROOTS`), `content`, `encoding` (`text/plain`, `b64`,
  `gzip` with `!!binary` content, `gz+b64`; cloud-init's spellings), `permissions` (default
  0644), `owner` (root only), `append`, `defer`. Files replace what is there, as in cloud-init.
  `defer` is accepted and changes nothing: Berth writes files before it creates users, and every
  file belongs to root anyway.
- `runcmd`: strings run by `/bin/sh -c`, lists run as argv; once, after everything else.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import yaml

from updater.provision.plan import (
    HOSTNAME,
    USER_NAME,
    Command,
    File,
    NotGzip,
    Plan,
    ProvisionError,
    User,
    check_password_hash,
    check_path,
    check_plan_contents,
    check_strings,
    field_error,
    gunzip,
    key_name,
    unsupported,
)

GZIP_MAGIC = b"\x1f\x8b"
DEFAULT_MODE = 0o644
ROOT_OWNERS = ("root", "root:root")

# The largest integer runcmd passes on as an argument (`[sleep, 5]`): a bigger one is a mistake,
# and past 4300 digits Python cannot even write it out.
_MAX_ARGUMENT_INT = 10**100
_JINJA_HEADER = re.compile(rb"##\s*template:\s*jinja")


class UserDataKind(StrEnum):
    """What a user-data blob is, from its first line."""

    EMPTY = "empty"  # nothing but whitespace: no config
    IGNITION = "ignition"  # a JSON object
    CLOUD_CONFIG = "cloud-config"
    SCRIPT = "script"  # `#!`: run once
    # cloud-init's other kinds, which Berth refuses by name.
    INCLUDE = "include"
    MIME_MULTIPART = "mime-multipart"
    CLOUD_BOOTHOOK = "cloud-boothook"
    UPSTART_JOB = "upstart-job"
    CLOUD_CONFIG_ARCHIVE = "cloud-config-archive"
    PART_HANDLER = "part-handler"
    JINJA = "jinja"
    UNKNOWN = "unknown"


# Longest first: `#cloud-config-archive` also starts with `#cloud-config`.
_HEADERS = (
    (b"#cloud-config-archive", UserDataKind.CLOUD_CONFIG_ARCHIVE),
    (b"#cloud-boothook", UserDataKind.CLOUD_BOOTHOOK),
    (b"#part-handler", UserDataKind.PART_HANDLER),
    (b"#upstart-job", UserDataKind.UPSTART_JOB),
    (b"#include", UserDataKind.INCLUDE),  # and `#include-once`
    (b"content-type:", UserDataKind.MIME_MULTIPART),
    (b"mime-version:", UserDataKind.MIME_MULTIPART),
)

_REFUSED_KINDS = {
    UserDataKind.INCLUDE: (
        "#include",
        "Berth fetches no configs from URLs listed in user-data; give the #cloud-config itself",
    ),
    UserDataKind.MIME_MULTIPART: (
        "MIME multi-part",
        "give one #cloud-config or one #! script, not a multi-part archive",
    ),
    UserDataKind.CLOUD_BOOTHOOK: (
        "#cloud-boothook",
        "it runs on every boot; use runcmd, or a systemd unit written with write_files",
    ),
    UserDataKind.UPSTART_JOB: ("#upstart-job", "Berth runs systemd; write a unit with write_files"),
    UserDataKind.CLOUD_CONFIG_ARCHIVE: ("#cloud-config-archive", "give one #cloud-config"),
    UserDataKind.PART_HANDLER: ("#part-handler", "Berth runs no handlers from user-data"),
    UserDataKind.JINJA: (
        "## template: jinja",
        "Berth has no instance data to render templates with; render it before handing it over",
    ),
}

# Every other top-level key is refused by name, with a hint where one helps.
_SUPPORTED_KEYS = frozenset(
    {
        "hostname",
        "fqdn",
        "preserve_hostname",
        "prefer_fqdn_over_hostname",
        "users",
        "ssh_authorized_keys",
        "write_files",
        "runcmd",
    }
)


_NO_PACKAGES = "Berth's root is read-only; run software in containers"
_NO_DISKS = "Berth grows STATE to fill the disk itself; the root is a fixed, verified image"
_KEY_HINTS = {
    "packages": _NO_PACKAGES,
    "package_update": _NO_PACKAGES,
    "package_upgrade": _NO_PACKAGES,
    "package_reboot_if_required": _NO_PACKAGES,
    "apt": _NO_PACKAGES,
    "yum_repos": _NO_PACKAGES,
    "snap": _NO_PACKAGES,
    "bootcmd": "it runs on every boot; Berth runs runcmd once after the config is applied: use "
    "runcmd, or a systemd unit written with write_files",
    "mounts": "write a systemd .mount unit with write_files",
    "swap": "write a systemd .swap unit with write_files",
    "ntp": "systemd-timesyncd keeps time: write /etc/systemd/timesyncd.conf.d/*.conf with "
    "write_files",
    "timezone": "Berth keeps UTC; set TZ in the containers",
    "user": "the default user is root: use users or ssh_authorized_keys",
    "groups": "groups must exist in the image; name them in users[].groups",
    "password": "give a crypt(3) hash in users[].passwd with lock_passwd: false",
    "chpasswd": "give a crypt(3) hash in users[].passwd with lock_passwd: false",
    "ssh_pwauth": "write an /etc/ssh/sshd_config.d/*.conf file with write_files",
    "disable_root": "root is Berth's login user: its keys come from ssh_authorized_keys",
    "ssh_import_id": "list the keys in ssh_authorized_keys",
    "ssh_keys": "sshd's host keys are generated on the machine's first boot",
    "manage_etc_hosts": "write /etc/hosts with write_files",
    "growpart": _NO_DISKS,
    "resize_rootfs": _NO_DISKS,
    "disk_setup": _NO_DISKS,
    "fs_setup": _NO_DISKS,
}

_USER_KEY_HINTS = {
    "sudo": "put the user in the sudo group (groups: [sudo]) for root without a password",
    "doas": "the image has no doas; log in as root",
    "plain_text_passwd": "give a crypt(3) hash in passwd (mkpasswd -m yescrypt prints one)",
    "ssh_import_id": "list the keys in ssh_authorized_keys",
    "shell": "users get the image's default shell",
}


def decompress(data: bytes, source: str) -> bytes:
    """User-data as meant: EC2 and OpenStack allow it gzip-compressed (undone once, as cloud-init
    does), up to MAX_DECOMPRESSED. The Ignition parser needs this too."""
    if not data.startswith(GZIP_MAGIC):
        return data
    try:
        return gunzip(data, source, "gzip'd user-data")
    except NotGzip as e:
        raise ProvisionError(
            f"{source}: user-data starts like gzip data but does not decompress: {e.reason}"
        ) from None


def classify(data: bytes, source: str = "user-data") -> UserDataKind:
    """The kind of a user-data blob (decompressing gzip first); a StrEnum, so a plain str too."""
    return _classify(decompress(data, source))


def parse_user_data(data: bytes, source: str) -> Plan | None:
    """A `#cloud-config` or `#!` script as a Plan; None for empty user-data (no config).

    Raises ProvisionError for everything else, Ignition included (see `classify`).
    """
    data = decompress(data, source)
    kind = _classify(data)
    if kind is UserDataKind.EMPTY:
        return None
    if kind is UserDataKind.SCRIPT:
        return Plan(source=source, format="script", script=data)
    if kind is UserDataKind.CLOUD_CONFIG:
        return _parse_cloud_config(data, source)
    if kind is UserDataKind.IGNITION:
        raise ProvisionError(
            f"{source}: this is an Ignition config (JSON): the Ignition parser reads it, "
            "not the cloud-config one"
        )
    if kind in _REFUSED_KINDS:
        name, hint = _REFUSED_KINDS[kind]
        raise unsupported(source, f"{name} user-data", hint)
    first = _first_line(data).decode("utf-8", "replace")
    if first.startswith("#!"):
        raise ProvisionError(f"{source}: a #! script must start with #!, not with blank space")
    raise ProvisionError(
        f"{source}: expected a config starting with #cloud-config, #! or an Ignition JSON object, "
        f"got {first!r}"
    )


def _classify(data: bytes) -> UserDataKind:
    # The kernel runs a script only if `#!` are its first two bytes: no leading blanks there.
    if data.startswith(b"#!"):
        return UserDataKind.SCRIPT
    text = data.lstrip()
    if not text:
        return UserDataKind.EMPTY
    if text.startswith(b"{"):
        return UserDataKind.IGNITION
    first = _first_line(text).lower()
    if first == b"#cloud-config":
        return UserDataKind.CLOUD_CONFIG
    if _JINJA_HEADER.match(first):
        return UserDataKind.JINJA
    for header, kind in _HEADERS:
        if first.startswith(header):
            return kind
    return UserDataKind.UNKNOWN


def _first_line(data: bytes) -> bytes:
    return data.lstrip().split(b"\n", 1)[0].rstrip()[:80]


# ---- cloud-config ---------------------------------------------------------------------------


@dataclass
class _UserDraft:
    """A user while its entries (top-level keys, `users`) are merged."""

    keys: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    password_hash: str | None = None
    where: str = ""  # the first entry that names the user

    def user(self, name: str) -> User:
        return User(
            name=name,
            ssh_authorized_keys=tuple(dict.fromkeys(self.keys)),
            groups=tuple(dict.fromkeys(self.groups)),
            password_hash=self.password_hash,
            where=self.where,
        )


def _parse_cloud_config(data: bytes, source: str) -> Plan:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProvisionError(f"{source}: cloud-config is not UTF-8 text (byte {e.start})") from e
    # The header stays in: it is a YAML comment, and line numbers then match the file.
    doc = load_yaml(text, source, "cloud-config")
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise field_error(
            source, "cloud-config", "a mapping of keys (hostname, users, write_files, ...)", doc
        )
    for key in doc:
        if not isinstance(key, str):
            raise field_error(source, "cloud-config", "keys that are strings", key)
        if key not in _SUPPORTED_KEYS:
            raise unsupported(source, key, _KEY_HINTS.get(key, ""))

    notes: list[str] = []
    hostname = _hostname(doc, source, notes)
    users = _users(doc, source, notes)
    files = _write_files(doc.get("write_files", []), source)
    commands = _runcmd(doc.get("runcmd", []), source)
    return Plan(
        source=source,
        format="cloud-config",
        hostname=hostname,
        hostname_where="hostname" if "hostname" in doc else "fqdn",
        users=users,
        files=files,
        commands=commands,
        notes=tuple(notes),
    )


def load_yaml(text: str | bytes, source: str, what: str = "") -> object:
    """One YAML document, its strings checked (`check_strings`), or a ProvisionError naming
    `source` (and `what` the document is, if the source does not say).

    PyYAML raises more than YAMLError on what a config can hold: ValueError for an integer past
    Python's 4300-digit limit or a timestamp such as 2001-13-45, RecursionError for lists nested
    a thousand deep.
    """
    invalid = f"{source}: {what + ' is ' if what else ''}not valid YAML"
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ProvisionError(f"{invalid}: {_yaml_problem(e)}") from None
    except RecursionError:
        raise ProvisionError(f"{invalid}: nested too deeply") from None
    except (ValueError, OverflowError) as e:
        # The message is Python's own, about one scalar; it holds none of the document.
        raise ProvisionError(f"{invalid}: {e}") from None
    check_strings(source, doc)
    return doc


def _yaml_problem(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        problem = e.problem or e.context or "syntax error"
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return str(e)


def _hostname(doc: Mapping[str, object], source: str, notes: list[str]) -> str | None:
    preserve = _bool(doc.get("preserve_hostname", False), source, "preserve_hostname")
    if _bool(doc.get("prefer_fqdn_over_hostname", False), source, "prefer_fqdn_over_hostname"):
        raise unsupported(
            source,
            "prefer_fqdn_over_hostname",
            "Berth's hostname is one label, the fqdn's first; the domain belongs in DNS",
        )
    names = {key: _dns_name(doc[key], source, key) for key in ("hostname", "fqdn") if key in doc}
    if not names:
        return None
    key = "hostname" if "hostname" in names else "fqdn"
    name = names[key]
    hostname = name.split(".", 1)[0]
    if preserve:
        notes.append(f"preserve_hostname: true: the hostname stays as it is, not {hostname!r}")
        return None
    if hostname != name:
        notes.append(f"hostname set to {hostname!r}, the first label of {key} {name!r}")
    return hostname


def _dns_name(value: object, source: str, path: str) -> str:
    if (
        not isinstance(value, str)
        or len(value) > 253
        or not all(HOSTNAME.fullmatch(label) for label in value.split("."))
    ):
        raise field_error(
            source, path, "a host name (letters, digits and '-'; at most 63 per label)", value
        )
    return value


def _users(doc: Mapping[str, object], source: str, notes: list[str]) -> tuple[User, ...]:
    drafts: dict[str, _UserDraft] = {}
    if "ssh_authorized_keys" in doc:
        keys = _ssh_keys(doc["ssh_authorized_keys"], source, "ssh_authorized_keys")
        drafts["root"] = _UserDraft(keys=keys, where="ssh_authorized_keys")
    listed: set[str] = set()
    for i, entry in enumerate(_list(doc.get("users", []), source, "users")):
        path = f"users[{i}]"
        if isinstance(entry, str):
            # "a, b" lists names, as in cloud-init, which also skips empty ones.
            for name in (n.strip() for n in entry.split(",")):
                # `default` is the distribution's login user; Berth's is root, which exists.
                if name and name != "default":
                    _check_user_name(name, source, path)
                    _claim(name, listed, source, path)
                    drafts.setdefault(name, _UserDraft(where=path))
            continue
        if not isinstance(entry, dict):
            raise field_error(source, path, "'default', a user name or a mapping", entry)
        name, draft = _user_entry(entry, source, path, notes)
        _claim(name, listed, source, f"{path}.name")
        merged = drafts.setdefault(name, _UserDraft(where=path))
        merged.keys += draft.keys
        merged.groups += draft.groups
        merged.password_hash = draft.password_hash
    return tuple(draft.user(name) for name, draft in drafts.items())


_USER_KEYS = frozenset(
    {"name", "ssh_authorized_keys", "groups", "passwd", "hashed_passwd", "lock_passwd"}
)


def _user_entry(
    entry: Mapping[object, object], source: str, path: str, notes: list[str]
) -> tuple[str, _UserDraft]:
    for key in entry:
        if key not in _USER_KEYS:
            raise unsupported(
                source, f"{path}.{key_name(key)}", _USER_KEY_HINTS.get(key_name(key), "")
            )
    if "name" not in entry:
        raise field_error(source, f"{path}.name", "a user name (the key is required)")
    name = _check_user_name(entry["name"], source, f"{path}.name")
    draft = _UserDraft()
    if "ssh_authorized_keys" in entry:
        draft.keys = _ssh_keys(entry["ssh_authorized_keys"], source, f"{path}.ssh_authorized_keys")
    if "groups" in entry:
        draft.groups = _groups(entry["groups"], source, f"{path}.groups")
    if "passwd" in entry and "hashed_passwd" in entry:
        raise field_error(source, f"{path}.hashed_passwd", "only one of passwd and hashed_passwd")
    hash_key = "passwd" if "passwd" in entry else "hashed_passwd"
    password_hash = None
    if hash_key in entry:
        password_hash = check_password_hash(source, f"{path}.{hash_key}", entry[hash_key])
    lock = _bool(entry.get("lock_passwd", True), source, f"{path}.lock_passwd")
    if not lock and password_hash is None:
        raise field_error(
            source,
            f"{path}.lock_passwd",
            "true unless passwd gives a crypt(3) hash: Berth unlocks no account without a password",
            False,
        )
    if lock and password_hash is not None:
        # cloud-init sets the hash, then `passwd -l` puts `!` in front of it.
        password_hash = "!" + password_hash
        notes.append(
            f"{path}.{hash_key}: {name}'s password is locked (lock_passwd is true by default); "
            "set lock_passwd: false to log in with it"
        )
    draft.password_hash = password_hash
    return name, draft


def _claim(name: str, listed: set[str], source: str, path: str) -> None:
    if name in listed:
        raise field_error(source, path, "each user listed once", name)
    listed.add(name)


def _check_user_name(value: object, source: str, path: str) -> str:
    if not isinstance(value, str) or not USER_NAME.fullmatch(value):
        raise field_error(
            source,
            path,
            "a user name (lowercase letters, digits, '_' and '-'; at most 32; not starting "
            "with a digit or '-')",
            value,
        )
    return value


def _ssh_keys(value: object, source: str, path: str) -> list[str]:
    keys = []
    for j, key in enumerate(_list(value, source, path)):
        if not isinstance(key, str) or not key.strip() or "\n" in key.strip():
            raise field_error(source, f"{path}[{j}]", "an SSH public key on one line", key)
        keys.append(key.strip())
    return keys


def _groups(value: object, source: str, path: str) -> list[str]:
    if isinstance(value, str):
        names: list[object] = [g.strip() for g in value.split(",")]
    else:
        names = _list(value, source, path, "a list of group names or 'a, b'")
    for j, group in enumerate(names):
        if not isinstance(group, str) or not USER_NAME.fullmatch(group):
            raise field_error(source, f"{path}[{j}]", "a group name", group)
    return [str(g) for g in names]


# ---- write_files ----------------------------------------------------------------------------

_FILE_KEYS = frozenset({"path", "content", "encoding", "permissions", "owner", "append", "defer"})
_FILE_KEY_HINTS = {"source": "put the contents in content"}
# cloud-init's spellings, after lower() and strip(); decoded left to right.
_ENCODINGS: dict[str, tuple[str, ...]] = {
    "": (),
    "text/plain": (),
    "b64": ("base64",),
    "base64": ("base64",),
    "gz": ("gzip",),
    "gzip": ("gzip",),
    "gz+b64": ("base64", "gzip"),
    "gz+base64": ("base64", "gzip"),
    "gzip+b64": ("base64", "gzip"),
    "gzip+base64": ("base64", "gzip"),
}


def _write_files(value: object, source: str) -> tuple[File, ...]:
    files: dict[str, File] = {}
    total = 0
    for i, entry in enumerate(_list(value, source, "write_files")):
        path = f"write_files[{i}]"
        if not isinstance(entry, dict):
            raise field_error(source, path, "a mapping with path and content", entry)
        for key in entry:
            if key not in _FILE_KEYS:
                hint = _FILE_KEY_HINTS.get(key_name(key), "")
                raise unsupported(source, f"{path}.{key_name(key)}", hint)
        if "path" not in entry:
            raise field_error(source, f"{path}.path", "an absolute path (the key is required)")
        target = check_path(source, f"{path}.path", entry["path"])
        contents = _contents(entry, source, path)
        total += len(contents)
        check_plan_contents(source, f"{path}.content", total)
        mode = _permissions(entry.get("permissions"), source, f"{path}.permissions")
        owner = entry.get("owner", "root")
        if not isinstance(owner, str):
            raise field_error(source, f"{path}.owner", "'root' or 'root:root'", owner)
        if owner not in ROOT_OWNERS:
            raise unsupported(
                source,
                f"{path}.owner",
                "files belong to root; chown them in runcmd, or run the service as that user",
            )
        append = _bool(entry.get("append", False), source, f"{path}.append")
        # Berth writes every file before it creates users; nothing to defer.
        _bool(entry.get("defer", False), source, f"{path}.defer")
        earlier = files.get(target)
        where = path
        if earlier is not None and append:
            # cloud-init writes entries in order: a second entry appends to the first's file.
            contents = earlier.contents + contents
            append = earlier.append
            where = f"{earlier.where}, {path}"
        elif earlier is not None:
            # cloud-init lets a second entry without append replace the first, which drops the
            # first entry's content without a word. Berth refuses it: one entry per file, or
            # append: true where the parts are meant to add up.
            raise ProvisionError(
                f"{source}: {path} and {earlier.where} both write {target}: keep one entry, "
                "or set append: true on the later one to add to the file"
            )
        files[target] = File(target, contents, mode, overwrite=True, append=append, where=where)
    return tuple(files.values())


def _contents(entry: Mapping[object, object], source: str, path: str) -> bytes:
    encoding = entry.get("encoding", "")
    if not isinstance(encoding, str) or encoding.strip().lower() not in _ENCODINGS:
        raise field_error(
            source, f"{path}.encoding", "text/plain, b64, gzip or gz+b64 (or absent)", encoding
        )
    steps = _ENCODINGS[encoding.strip().lower()]
    content = entry.get("content", "")
    if content is None:
        content = ""
    if not isinstance(content, str | bytes):
        raise field_error(source, f"{path}.content", "a string, or !!binary bytes", content)
    if steps and steps[0] == "gzip" and isinstance(content, str):
        raise field_error(
            source,
            f"{path}.content",
            "!!binary bytes with encoding gzip (base64 text needs encoding gz+b64)",
        )
    data = content.encode() if isinstance(content, str) else content
    for step in steps:
        if step == "base64":
            try:
                # cloud-init's b64decode skips line breaks; anything else outside base64 is wrong.
                data = base64.b64decode(b"".join(data.split()), validate=True)
            except binascii.Error as e:
                raise field_error(source, f"{path}.content", f"base64 text ({e})") from e
        else:
            data = gunzip(data, source, f"{path}.content")
    return data


def _permissions(value: object, source: str, path: str) -> int:
    if value is None:
        return DEFAULT_MODE
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML reads an unquoted 0644 as octal but 644 as decimal (0o1204): refuse what is most
        # likely that slip. setuid, setgid and sticky bits need the quoted form.
        if 0 <= value <= 0o777:
            return value
        raise field_error(
            source, path, "a quoted octal mode such as '0644' (unquoted 644 is decimal)", value
        )
    if isinstance(value, str):
        try:
            mode = int(value.strip(), 8)
        except ValueError:
            mode = -1
        if 0 <= mode <= 0o7777:
            return mode
    raise field_error(source, path, "an octal mode such as '0644'", value)


# ---- runcmd ---------------------------------------------------------------------------------


def _runcmd(value: object, source: str) -> tuple[Command, ...]:
    commands = []
    for i, entry in enumerate(_list(value, source, "runcmd")):
        path = f"runcmd[{i}]"
        if isinstance(entry, str) and entry.strip():
            commands.append(Command(shell=entry))
        elif isinstance(entry, list) and entry:
            argv = []
            for j, arg in enumerate(entry):
                # cloud-init quotes str(arg): `[sleep, 5]` is common.
                if (
                    isinstance(arg, bool)
                    or not isinstance(arg, str | int)
                    or (isinstance(arg, int) and abs(arg) > _MAX_ARGUMENT_INT)
                ):
                    raise field_error(source, f"{path}[{j}]", "a string", arg)
                argv.append(str(arg))
            commands.append(Command(argv=tuple(argv)))
        else:
            raise field_error(
                source, path, "a shell command (string) or an argument list (list)", entry
            )
    return tuple(commands)


# ---- plain values ---------------------------------------------------------------------------


def _list(value: object, source: str, path: str, expected: str = "a list") -> list[object]:
    if not isinstance(value, list):
        raise field_error(source, path, expected, value)
    return value


def _bool(value: object, source: str, path: str) -> bool:
    if not isinstance(value, bool):
        raise field_error(source, path, "true or false", value)
    return value
