"""The release manifest (`manifest.json`): one format, written by the builder, read by the agent.

Standard library only: the agent runs on the image's own Python.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO

from updater.limits import MAX_SIZE_BYTES
from updater.release.document import json_object
from updater.release.version import Version

# The release payload: what the agent writes into a slot and onto the ESP.
PAYLOAD_FILES = ("root.erofs", "root.verity", "uki.efi")
_HEX64 = re.compile(r"[0-9a-f]{64}")  # used with fullmatch: "$" would allow a "\n"


class ManifestError(ValueError):
    """A manifest is malformed; the message names the source, the field and what was expected."""


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    image: str
    version: Version
    arch: str
    roothash: str
    files: Mapping[str, FileEntry] = field(default_factory=lambda: MappingProxyType({}))

    def to_json(self) -> str:
        doc = {
            "image": self.image,
            "version": str(self.version),
            "arch": self.arch,
            "roothash": self.roothash,
            "files": {
                name: {"size": e.size, "sha256": e.sha256} for name, e in sorted(self.files.items())
            },
        }
        return json.dumps(doc, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "manifest.json") -> Manifest:
        doc = json_object(text, source, ManifestError)

        def text_field(key: str) -> str:
            value = doc.get(key)
            if not isinstance(value, str) or not value:
                raise ManifestError(f"{source}: field '{key}': expected a string, got {value!r}")
            return value

        version_text = text_field("version")
        try:
            version = Version.parse(version_text)
        except ValueError as e:
            raise ManifestError(f"{source}: field 'version': {e}") from None
        roothash = text_field("roothash")
        if not _HEX64.fullmatch(roothash):
            raise ManifestError(f"{source}: field 'roothash': expected 64 hex digits")
        raw_files = doc.get("files")
        if not isinstance(raw_files, dict):
            raise ManifestError(f"{source}: field 'files': expected an object")
        files: dict[str, FileEntry] = {}
        for name, entry in raw_files.items():
            where = f"{source}: field 'files.{name}'"
            if not isinstance(entry, dict):
                raise ManifestError(f"{where}: expected an object with size and sha256")
            size, digest = entry.get("size"), entry.get("sha256")
            if (
                not isinstance(size, int)
                or isinstance(size, bool)
                or not 0 <= size <= MAX_SIZE_BYTES
            ):
                raise ManifestError(
                    f"{where}.size: expected a non-negative integer of at most 1 TiB "
                    f"({MAX_SIZE_BYTES})"
                )
            if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
                raise ManifestError(f"{where}.sha256: expected 64 hex digits")
            files[name] = FileEntry(size, digest)
        unknown = set(doc) - {"image", "version", "arch", "roothash", "files"}
        if unknown:
            raise ManifestError(f"{source}: unknown field(s): {', '.join(sorted(unknown))}")
        return cls(
            image=text_field("image"),
            version=version,
            arch=text_field("arch"),
            roothash=roothash,
            files=MappingProxyType(files),
        )


def hash_file(path: Path, chunk: int = 1 << 20, *, copy_to: BinaryIO | None = None) -> FileEntry:
    """The length and sha256 of `path`; with `copy_to`, each block is also written there.

    One read serves both, so a copy made this way is exactly the bytes that were hashed, even if
    `path` changes meanwhile.
    """
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
            if copy_to is not None:
                copy_to.write(block)
    return FileEntry(size, h.hexdigest())


def describe(files: Mapping[str, Path]) -> dict[str, FileEntry]:
    return {name: hash_file(path) for name, path in files.items()}
