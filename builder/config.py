"""Image definitions: `images/<name>.toml`, validated and merged along `extends` into ImageConfig.

Every error names the file, the dotted key, what was expected and what was found, because the
person reading it is editing that file right now.
"""

from __future__ import annotations

import difflib
import json
import re
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlsplit

from builder.errors import ConfigError
from updater import config as agent_config
from updater.files import read_utf8, toml_document
from updater.limits import MAX_DIGITS, MAX_SIZE_BYTES

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB


class OutputFormat(StrEnum):
    """Disk image formats, each converted from the GPT disk.raw by builder.formats.

    Platforms and how to import each: docs/platforms.md.
    """

    RAW = "raw"  # sparse GPT disk: QEMU, dd
    QCOW2 = "qcow2"  # QEMU/KVM, OpenStack
    VMDK = "vmdk"  # VMware stream-optimized disk
    OVA = "ova"  # VMware appliance: OVF descriptor + the stream-optimized disk + manifest
    VHD = "vhd"  # Azure: fixed VHD, a whole number of MiB
    GCE = "gce"  # Google Compute Engine: disk.raw in a gzip'd tar
    RAW_ZST = "raw.zst"  # bare metal: zstd-compressed disk.raw to write to a drive


class Encryption(StrEnum):
    """Whether first boot makes STATE a LUKS2 volume sealed to the TPM (docs/security.md)."""

    AUTO = "auto"  # when the machine has a TPM 2.0 at first boot; plain ext4 otherwise
    TPM2 = "tpm2"  # always: a machine without a TPM 2.0 refuses to boot rather than go plain
    OFF = "off"  # never: STATE stays plain ext4


class Compression(StrEnum):
    """erofs compressors (`mkfs.erofs -z`); the image's kernel must be able to decompress them."""

    NONE = "none"
    LZ4 = "lz4"
    LZ4HC = "lz4hc"
    LZMA = "lzma"
    DEFLATE = "deflate"
    ZSTD = "zstd"


# Measured on containerhost under TCG (bench/bench_image.py, 3 boots each): lz4hc level 9 gives a
# 190 MB root and a 218 MB payload, zstd level 3 with 256 KiB clusters a 170 MB root and a 198 MB
# payload; boot times to SSH overlap (lz4hc 74-101 s, zstd 70-119 s), warm rebuilds 16 s vs 20 s.
# zstd is the one that meets the payload target at no measurable boot cost.
DEFAULT_COMPRESSION = Compression.ZSTD
# The formats CI and `./build.py run` use; the others cost a conversion each and are opt-in.
DEFAULT_FORMATS: tuple[OutputFormat, ...] = (OutputFormat.RAW, OutputFormat.QCOW2)
DEFAULT_SUITE = "trixie"

# Below these a build would fail late or the machine would soon be stuck; say so while parsing.
MIN_ESP = 100 * MiB  # two UKIs (current and previous version) with room for an update
MIN_ROOT = 256 * MiB
MIN_VERITY = 1 * MiB
MIN_STATE = 64 * MiB


@dataclass(frozen=True)
class Partitions:
    """Partition sizes in bytes; root and verity are per slot (A and B have equal sizes)."""

    esp: int = 1 * GiB
    root: int = 2 * GiB
    verity: int = 128 * MiB
    state: int = 512 * MiB  # only the size inside the image file: first boot grows it to the disk


@dataclass(frozen=True)
class UpdateSettings:
    """What the update agent follows: a channel in the repository at `url` ("" = not configured)."""

    channel: str = "stable"
    url: str = ""


def _no_variables() -> Mapping[str, str]:
    return MappingProxyType({})


# A moment of the snapshot archive, as its URLs spell it: UTC, to the second.
SNAPSHOT_RE = re.compile(
    r"(19|20)\d\d(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])T([01]\d|2[0-3])[0-5]\d[0-5]\dZ"
)


@dataclass(frozen=True)
class ImageConfig:
    """One image definition with its `extends` chain applied."""

    name: str
    path: Path
    description: str = ""
    suite: str = DEFAULT_SUITE
    # None: the build host's apt configuration or BERTH_MIRROR decides (see builder.rootfs).
    mirror: str | None = None
    # A moment of Debian's snapshot archive ("20261201T000000Z"): the packages as they were
    # then, for an exact rebuild; and where that archive is (see builder.rootfs.apt_sources).
    snapshot: str | None = None
    snapshot_mirror: str | None = None
    packages: tuple[str, ...] = ()
    overlays: tuple[str, ...] = ()
    cmdline: tuple[str, ...] = ()
    compression: Compression = DEFAULT_COMPRESSION
    partitions: Partitions = field(default_factory=Partitions)
    formats: tuple[OutputFormat, ...] = DEFAULT_FORMATS
    update: UpdateSettings = field(default_factory=UpdateSettings)
    extends: tuple[str, ...] = ()  # parents, nearest first
    # Container image archives (oci-archive or docker-archive) baked into the root's read-only
    # image store (builder.preload); absolute paths, parents' first.
    preload: tuple[Path, ...] = ()
    encrypt: Encryption = Encryption.AUTO
    # Also seal STATE to PCR 7 (the Secure Boot state: PK, KEK, db, dbx); a dbx update then
    # needs the recovery key once (docs/security.md).
    encrypt_bind_pcr7: bool = False
    # Read-only mapping; left out of the hash because a mapping proxy is unhashable.
    variables: Mapping[str, str] = field(default_factory=_no_variables, hash=False)


_TOP_KEYS = (
    "description",
    "extends",
    "suite",
    "mirror",
    "snapshot",
    "snapshot_mirror",
    "packages",
    "overlays",
    "cmdline",
    "compression",
    "formats",
    "partitions",
    "update",
    "variables",
    "preload",
    "encrypt",
    "encrypt_bind_pcr7",
)
_PARTITION_KEYS = ("esp", "root", "verity", "state")
_PARTITION_MINIMUMS = {"esp": MIN_ESP, "root": MIN_ROOT, "verity": MIN_VERITY, "state": MIN_STATE}
_UPDATE_KEYS = ("channel", "url")

# Lower-case and no dots: image names end up in output file names, and "base.toml" is a typo.
# Names that become path components are bounded: a longer one would meet the file system's limit
# (ENAMETOOLONG) as an OSError far from the definition that named it.
_NAME_MAX = 64
_IMAGE_NAME_RE = re.compile(rf"[a-z0-9][a-z0-9_-]{{0,{_NAME_MAX - 1}}}")
# Debian Policy 5.6.7; a leading "-" (removal from the inherited list) is split off before.
_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
_OVERLAY_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{_NAME_MAX - 1}}}")
_SUITE_RE = re.compile(rf"[a-z][a-z0-9-]{{0,{_NAME_MAX - 1}}}")
# Variables become jinja2 template names, so they must be identifiers.
_VARIABLE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SIZE_RE = re.compile(rf"([0-9]{{1,{MAX_DIGITS}}})\s*([KMGT])(iB)?", re.IGNORECASE)
_SIZE_UNITS = {"K": KiB, "M": MiB, "G": GiB, "T": TiB}
# The build appends roothash= from the verity tree it made; a second one would clash with it.
_RESERVED_CMDLINE = ("roothash=", "usrhash=")

_T = TypeVar("_T")


@dataclass(frozen=True)
class _Source:
    """A definition file and how to show it in messages."""

    path: Path
    shown: str

    def error(self, key: str, expected: str, got: str, hint: str | None = None) -> ConfigError:
        return ConfigError(f"{self.shown}: key '{key}': expected {expected}, got {got}", hint=hint)

    def wrong_type(self, key: str, expected: str, value: object) -> ConfigError:
        return self.error(key, expected, f"{_kind(value)}: {_show(value)}")


@dataclass(frozen=True)
class _Layer:
    """What one file sets; None or empty means "inherit"."""

    source: _Source
    description: str | None
    extends: str | None
    suite: str | None
    mirror: str | None
    snapshot: str | None
    snapshot_mirror: str | None
    packages: tuple[str, ...]
    overlays: tuple[str, ...]
    cmdline: tuple[str, ...]
    compression: Compression | None
    formats: tuple[OutputFormat, ...] | None
    partitions: Mapping[str, int]
    update: Mapping[str, str]
    variables: Mapping[str, str]
    preload: tuple[Path, ...]
    encrypt: Encryption | None
    encrypt_bind_pcr7: bool | None


def list_images(images_dir: Path) -> list[str]:
    """Names of the image definitions in `images_dir`, sorted."""
    if not images_dir.is_dir():
        raise ConfigError(
            f"{images_dir}: no such directory", hint="image definitions live in images/<name>.toml"
        )
    return _image_names(images_dir)


def load_image(name_or_path: str, images_dir: Path) -> ImageConfig:
    """Load an image by name (`images_dir/<name>.toml`) or by path to its .toml file.

    Parents named by `extends` are looked up beside the file; overlays in `images_dir/../overlays`.
    """
    if "/" in name_or_path or name_or_path.endswith(".toml"):
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"{name_or_path}: no such image definition file")
    else:
        if not _IMAGE_NAME_RE.fullmatch(name_or_path):
            raise ConfigError(
                f"{name_or_path!r} is not an image name",
                hint=(
                    "an image name is a file name in images/ without .toml, like "
                    f"'containerhost', of at most {_NAME_MAX} characters"
                ),
            )
        path = images_dir / f"{name_or_path}.toml"
        if not path.is_file():
            available = ", ".join(_image_names(images_dir)) or "none"
            raise ConfigError(
                f"no image named '{name_or_path}': {_shown(path, images_dir)} does not exist",
                hint=f"images in {_shown(images_dir, images_dir)}: {available}",
            )
    return _resolve(path.absolute(), images_dir, ())


def _image_names(images_dir: Path) -> list[str]:
    try:
        return sorted(p.stem for p in images_dir.glob("*.toml") if _IMAGE_NAME_RE.fullmatch(p.stem))
    except OSError:
        return []


def _resolve(path: Path, images_dir: Path, chain: tuple[Path, ...]) -> ImageConfig:
    source = _Source(path, _shown(path, images_dir))
    layer = _parse_layer(source, _read_toml(source), images_dir)
    if layer.extends is None:
        parent = ImageConfig(name=path.stem, path=path)
    else:
        parent_path = path.parent / f"{layer.extends}.toml"
        seen = [p.resolve() for p in (*chain, path)]
        if parent_path.resolve() in seen:
            cycle = [*chain[seen.index(parent_path.resolve()) :], path, parent_path]
            raise ConfigError(
                f"{source.shown}: key 'extends': expected an image that does not extend this one, "
                f"got the cycle {' -> '.join(_shown(p, images_dir) for p in cycle)}"
            )
        if not parent_path.is_file():
            available = ", ".join(_image_names(path.parent)) or "none"
            raise source.error(
                "extends",
                "the name of another image in the same directory",
                f'"{layer.extends}" ({_shown(parent_path, images_dir)} does not exist)',
                hint=f"images there: {available}",
            )
        parent = _resolve(parent_path, images_dir, (*chain, path))
    return _apply(parent, layer, path)


def _apply(parent: ImageConfig, layer: _Layer, path: Path) -> ImageConfig:
    source = layer.source
    partitions = replace(parent.partitions, **layer.partitions)
    hash_tree = _verity_hash_size(partitions.root)
    if partitions.verity < hash_tree:
        needed = -(-hash_tree // MiB) * MiB
        raise source.error(
            "partitions.verity",
            f"at least {_format_size(needed)} to hold the hash tree of a "
            f"{_format_size(partitions.root)} root slot",
            _format_size(partitions.verity),
        )
    return ImageConfig(
        name=path.stem,
        path=path,
        description=_pick(layer.description, parent.description),
        suite=_pick(layer.suite, parent.suite),
        mirror=_pick(layer.mirror, parent.mirror),
        snapshot=_pick(layer.snapshot, parent.snapshot),
        snapshot_mirror=_pick(layer.snapshot_mirror, parent.snapshot_mirror),
        packages=_merge_packages(source, parent.packages, layer.packages),
        overlays=_unique((*parent.overlays, *layer.overlays)),
        cmdline=_unique((*parent.cmdline, *layer.cmdline)),
        compression=_pick(layer.compression, parent.compression),
        partitions=partitions,
        formats=_pick(layer.formats, parent.formats),
        update=replace(parent.update, **layer.update),
        extends=(layer.extends, *parent.extends) if layer.extends is not None else (),
        variables=MappingProxyType({**parent.variables, **layer.variables}),
        preload=tuple(dict.fromkeys((*parent.preload, *layer.preload))),
        encrypt=_pick(layer.encrypt, parent.encrypt),
        encrypt_bind_pcr7=_pick(layer.encrypt_bind_pcr7, parent.encrypt_bind_pcr7),
    )


def _pick(value: _T | None, inherited: _T) -> _T:
    return inherited if value is None else value


def _unique(items: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _merge_packages(
    source: _Source, inherited: tuple[str, ...], entries: tuple[str, ...]
) -> tuple[str, ...]:
    removed = {entry[1:] for entry in entries if entry.startswith("-")}
    added = [entry for entry in entries if not entry.startswith("-")]
    for name in sorted(removed):
        # A removal that matches nothing is almost always a typo that would silently do nothing.
        if name not in inherited:
            raise source.error(
                "packages",
                "'-name' to remove a package that a parent image installs",
                f'"-{name}" (not in the inherited package list)',
            )
        if name in added:
            raise source.error(
                "packages", "a package either added or removed", f'both "{name}" and "-{name}"'
            )
    return _unique([name for name in inherited if name not in removed] + added)


def _verity_hash_size(data_size: int, block_size: int = 4096, digest_size: int = 32) -> int:
    """Bytes of a dm-verity hash tree (sha256, 4 KiB blocks) plus its superblock."""
    per_block = block_size // digest_size
    blocks = -(-data_size // block_size)
    total = 1  # veritysetup's superblock
    while blocks > 1:
        blocks = -(-blocks // per_block)
        total += blocks
    return total * block_size


def _read_toml(source: _Source) -> dict[str, Any]:
    # The agent's readers: not UTF-8, nested too deeply, a 5000-digit integer are refusals too.
    text = read_utf8(source.path, ConfigError, source.shown)
    return toml_document(
        text, source.shown, lambda message: ConfigError(message, hint="see https://toml.io")
    )


def _parse_layer(source: _Source, table: dict[str, Any], images_dir: Path) -> _Layer:
    _check_keys(source, table, _TOP_KEYS, "")

    extends = _string(source, table, "extends")
    if extends is not None and not _IMAGE_NAME_RE.fullmatch(extends):
        raise source.error(
            "extends", 'an image name like "base" (the file name without .toml)', _show(extends)
        )

    suite = _string(source, table, "suite")
    if suite is not None and not _SUITE_RE.fullmatch(suite):
        raise source.error("suite", 'a Debian suite or codename like "trixie"', _show(suite))

    mirror = _string(source, table, "mirror")
    if mirror is not None and not _is_url(mirror, ("http", "https", "file")):
        raise source.error("mirror", "an http://, https:// or file:// URL", _show(mirror))

    snapshot = _string(source, table, "snapshot")
    if snapshot is not None and not SNAPSHOT_RE.fullmatch(snapshot):
        raise source.error(
            "snapshot", 'a snapshot time like "20261201T000000Z" (UTC)', _show(snapshot)
        )
    snapshot_mirror = _string(source, table, "snapshot_mirror")
    if snapshot_mirror is not None and not _is_url(snapshot_mirror, ("http", "https", "file")):
        raise source.error(
            "snapshot_mirror", "an http://, https:// or file:// URL", _show(snapshot_mirror)
        )

    packages = _string_list(source, table, "packages")
    for entry in packages:
        if not _PACKAGE_RE.fullmatch(entry.removeprefix("-")):
            raise source.error(
                "packages",
                "Debian package names (lower-case letters, digits, '+', '-', '.'; "
                "prefix '-' to remove an inherited one)",
                _show(entry),
            )

    overlays = _string_list(source, table, "overlays")
    overlays_dir = images_dir.parent / "overlays"
    for name in overlays:
        if not _OVERLAY_RE.fullmatch(name):
            raise source.error(
                "overlays",
                f"names of directories in overlays/ (at most {_NAME_MAX} characters)",
                _show(name),
            )
        if not (overlays_dir / name).is_dir():
            existing = sorted(p.name for p in overlays_dir.glob("*") if p.is_dir())
            raise source.error(
                "overlays",
                f"a directory {_shown(overlays_dir / name, images_dir)}",
                f"{_show(name)} (no such directory)",
                hint=f"overlays available: {', '.join(existing) or 'none'}",
            )

    cmdline = _string_list(source, table, "cmdline")
    for word in cmdline:
        # The kernel reads '"' as the start of a quoted value that may hold spaces: a word with
        # one would swallow the words after it, roothash= among them.
        if not word or not all(" " < c < "\x7f" and c != '"' for c in word):
            raise source.error(
                "cmdline",
                "one kernel command-line word per string, of printable ASCII without spaces or "
                "'\"'",
                _show(word),
            )
        if word.startswith(_RESERVED_CMDLINE):
            raise source.error(
                "cmdline", "no roothash=/usrhash= (the build computes them)", _show(word)
            )

    compression = _choice(source, table, "compression", Compression)

    formats: tuple[OutputFormat, ...] | None = None
    if "formats" in table:
        names = _string_list(source, table, "formats")
        if not names:
            raise source.error("formats", "at least one output format", "[]")
        formats = tuple(dict.fromkeys(_enum(source, "formats", n, OutputFormat) for n in names))

    partitions: dict[str, int] = {}
    for key, value in _table(source, table, "partitions", _PARTITION_KEYS).items():
        partitions[key] = _size(source, f"partitions.{key}", value, _PARTITION_MINIMUMS[key])

    # The agent's own parser judges what goes into the image's update.toml: a value the builder
    # took and the agent refused would bake a dead agent into a verity-protected image.
    update: dict[str, str] = {}
    update_table = _table(source, table, "update", _UPDATE_KEYS)
    for key in update_table:
        value = _string(source, update_table, key, "update.")
        try:
            agent_config.parse_key("update", key, value)
        except ValueError as error:
            raise ConfigError(
                f"{source.shown}: key 'update.{key}': {error} (the update agent's rule)"
            ) from None
        update[key] = str(value)

    variables: dict[str, str] = {}
    for key, value in _table(source, table, "variables", None).items():
        if not _VARIABLE_RE.fullmatch(key):
            raise source.error(
                "variables", "variable names usable in templates (letters, digits, _)", _show(key)
            )
        if not isinstance(value, str):
            raise source.wrong_type(f"variables.{key}", "a string", value)
        variables[key] = value

    preload = tuple(
        _archive(source, entry, images_dir) for entry in _string_list(source, table, "preload")
    )

    return _Layer(
        source=source,
        description=_string(source, table, "description"),
        extends=extends,
        suite=suite,
        mirror=mirror,
        snapshot=snapshot,
        snapshot_mirror=snapshot_mirror,
        packages=packages,
        overlays=overlays,
        cmdline=cmdline,
        compression=compression,
        formats=formats,
        partitions=partitions,
        update=update,
        variables=variables,
        preload=preload,
        encrypt=_choice(source, table, "encrypt", Encryption),
        encrypt_bind_pcr7=_boolean(source, table, "encrypt_bind_pcr7"),
    )


def _archive(source: _Source, entry: str, images_dir: Path) -> Path:
    """A `preload` entry: a container image archive, relative to the definition's directory."""
    expected = "paths of container image archives (oci-archive or docker-archive tar files)"
    if not entry:
        raise source.error("preload", expected, '""')
    path = (source.path.parent / entry).resolve()
    shown = _shown(path, images_dir)
    if not path.is_file():
        raise source.error(
            "preload",
            expected,
            f"{_show(entry)} ({shown} does not exist or is not a file)",
            hint="relative paths are relative to the directory of the image definition",
        )
    try:
        is_tar = tarfile.is_tarfile(path)
    except OSError as error:
        raise source.error("preload", expected, f"{_show(entry)} ({error.strerror})") from None
    if not is_tar:
        raise source.error(
            "preload",
            expected,
            f"{_show(entry)} ({shown} is not a tar archive)",
            hint="make one with `podman save --format oci-archive -o FILE IMAGE`",
        )
    return path


def _check_keys(
    source: _Source, table: Mapping[str, Any], known: Sequence[str], prefix: str
) -> None:
    for key in table:
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1)
        if close:
            detail = f"did you mean '{prefix}{close[0]}'?"
        else:
            detail = "expected one of " + ", ".join(f"'{prefix}{k}'" for k in known)
        raise ConfigError(f"{source.shown}: unknown key '{prefix}{key}': {detail}")


def _string(source: _Source, table: Mapping[str, Any], key: str, prefix: str = "") -> str | None:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, str):
        raise source.wrong_type(prefix + key, "a string", value)
    return value


def _boolean(source: _Source, table: Mapping[str, Any], key: str) -> bool | None:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, bool):
        raise source.wrong_type(key, "true or false", value)
    return value


def _string_list(source: _Source, table: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise source.wrong_type(key, "a list of strings", value)
    return tuple(value)


def _table(
    source: _Source, table: Mapping[str, Any], key: str, known: Sequence[str] | None
) -> dict[str, Any]:
    value = table.get(key, {})
    if not isinstance(value, dict):
        raise source.wrong_type(key, f"a table ([{key}])", value)
    if known is not None:
        _check_keys(source, value, known, f"{key}.")
    return value


_E = TypeVar("_E", bound=StrEnum)


def _choice(source: _Source, table: Mapping[str, Any], key: str, choices: type[_E]) -> _E | None:
    value = _string(source, table, key)
    return None if value is None else _enum(source, key, value, choices)


def _enum(source: _Source, key: str, value: str, choices: type[_E]) -> _E:
    try:
        return choices(value)
    except ValueError:
        names = [member.value for member in choices]
        close = difflib.get_close_matches(value, names, n=1)
        raise source.error(
            key,
            "one of " + ", ".join(f'"{name}"' for name in names),
            _show(value),
            hint=f'did you mean "{close[0]}"?' if close else None,
        ) from None


def _size(source: _Source, key: str, value: object, minimum: int) -> int:
    expected = 'a size like "1G" or "512M" (binary units K, M, G, T) or a number of bytes'
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise source.error(key, expected, _show(value))
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.fullmatch(value.strip())
        if match is None:
            raise source.error(key, expected, _show(value))
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
    if size <= 0 or size % MiB:
        raise source.error(key, "a positive whole number of MiB", _show(value))
    if size > MAX_SIZE_BYTES:
        raise source.error(key, f"at most {_format_size(MAX_SIZE_BYTES)}", _show(value))
    if size < minimum:
        raise source.error(key, f"at least {_format_size(minimum)}", _show(value))
    return size


def _format_size(size: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return str(size)


def _is_url(text: str, schemes: Sequence[str]) -> bool:
    if any(c.isspace() for c in text):
        return False
    parts = urlsplit(text)
    if parts.scheme not in schemes:
        return False
    return bool(parts.path.startswith("/")) if parts.scheme == "file" else bool(parts.netloc)


def _shown(path: Path, images_dir: Path) -> str:
    """`path` relative to the repository root (the parent of images/) or the working directory."""
    absolute = path.absolute()
    for base in (images_dir.absolute().parent, Path.cwd()):
        if absolute.is_relative_to(base):
            return str(absolute.relative_to(base))
    return str(path)


def _kind(value: object) -> str:
    kinds: list[tuple[type, str]] = [
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (list, "an array"),
        (dict, "a table"),
    ]
    for cls, name in kinds:
        if isinstance(value, cls):
            return name
    return "a date/time" if hasattr(value, "isoformat") else type(value).__name__


def _show(value: object) -> str:
    """`value` written the way TOML would, shortened to fit in one message line."""
    text = _toml_literal(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _toml_literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_literal(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_literal(v)}" for k, v in value.items()) + "}"
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    return repr(value)
