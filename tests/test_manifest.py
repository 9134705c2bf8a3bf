"""The release manifest: round trip, and every rejection naming the field at fault."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from updater.release.manifest import FileEntry, Manifest, ManifestError, describe, hash_file
from updater.release.version import Version

ROOTHASH = "00112233445566778899aabbccddeeff0123456789abcdeffedcba9876543210"
DIGEST = "ab" * 32


def valid() -> dict[str, Any]:
    return {
        "image": "containerhost",
        "version": "2025.1122.3",
        "arch": "x86_64",
        "roothash": ROOTHASH,
        "files": {
            "root.erofs": {"size": 123456, "sha256": DIGEST},
            "uki.efi": {"size": 0, "sha256": "cd" * 32},
        },
    }


def parse(doc: object, source: str = "channels/stable/manifest.json") -> Manifest:
    return Manifest.from_json(json.dumps(doc), source)


def test_round_trip() -> None:
    manifest = Manifest(
        image="containerhost",
        version=Version(2025, 1122, 3),
        arch="x86_64",
        roothash=ROOTHASH,
        files=MappingProxyType(
            {
                "uki.efi": FileEntry(10, "cd" * 32),
                "root.erofs": FileEntry(123456, DIGEST),
            }
        ),
    )
    text = manifest.to_json()
    assert text.endswith("}\n")
    back = Manifest.from_json(text)
    assert back == manifest
    assert back.to_json() == text
    # Files are written sorted, so the bytes do not depend on insertion order.
    assert list(json.loads(text)["files"]) == ["root.erofs", "uki.efi"]
    assert json.loads(text)["version"] == "2025.1122.3"


def test_valid_document_parses() -> None:
    manifest = parse(valid())
    assert manifest.version == Version(2025, 1122, 3)
    assert manifest.files["root.erofs"] == FileEntry(123456, DIGEST)
    assert dict(manifest.files) == {
        "root.erofs": FileEntry(123456, DIGEST),
        "uki.efi": FileEntry(0, "cd" * 32),
    }
    with pytest.raises(TypeError):
        manifest.files["x"] = FileEntry(1, DIGEST)  # type: ignore[index]


def test_empty_files_object_is_allowed() -> None:
    doc = valid()
    doc["files"] = {}
    assert parse(doc).files == {}


def test_not_json_names_the_source() -> None:
    with pytest.raises(ManifestError, match=r"^m\.json: not valid JSON: "):
        Manifest.from_json("{not json", "m.json")


@pytest.mark.parametrize("top", [[], "text", 3, None])
def test_top_level_must_be_an_object(top: object) -> None:
    with pytest.raises(ManifestError, match=r"^src: expected a JSON object at the top level$"):
        parse(top, "src")


def _without(key: str) -> dict[str, Any]:
    doc = valid()
    del doc[key]
    return doc


def _with(key: str, value: object) -> dict[str, Any]:
    doc = valid()
    doc[key] = value
    return doc


def _with_file(name: str, value: object) -> dict[str, Any]:
    doc = valid()
    doc["files"][name] = value
    return doc


CASES: list[tuple[dict[str, Any], str]] = [
    (_without("image"), "field 'image': expected a string, got None"),
    (_with("image", ""), "field 'image': expected a string, got ''"),
    (_with("image", 7), "field 'image': expected a string, got 7"),
    (_without("version"), "field 'version': expected a string, got None"),
    (_with("version", 2025), "field 'version': expected a string, got 2025"),
    (_with("version", "2025.01.1"), "field 'version': version '2025.01.1' is not MAJOR.MINOR"),
    (_with("version", "1.2"), "field 'version': version '1.2' is not"),
    (_without("arch"), "field 'arch': expected a string, got None"),
    (_with("arch", ["x86_64"]), "field 'arch': expected a string, got ['x86_64']"),
    (_without("roothash"), "field 'roothash': expected a string, got None"),
    (_with("roothash", ROOTHASH[:-1]), "field 'roothash': expected 64 hex digits"),
    (_with("roothash", ROOTHASH.upper()), "field 'roothash': expected 64 hex digits"),
    (_with("roothash", ROOTHASH + "\n"), "field 'roothash': expected 64 hex digits"),
    (_with("roothash", "g" * 64), "field 'roothash': expected 64 hex digits"),
    (_without("files"), "field 'files': expected an object"),
    (_with("files", [["root.erofs", 1, DIGEST]]), "field 'files': expected an object"),
    (_with_file("uki.efi", "abc"), "field 'files.uki.efi': expected an object with size"),
    (_with_file("uki.efi", {"sha256": DIGEST}), "field 'files.uki.efi'.size: expected a non-neg"),
    (_with_file("x", {"size": -1, "sha256": DIGEST}), "field 'files.x'.size: expected a non-neg"),
    (_with_file("x", {"size": 1.0, "sha256": DIGEST}), "field 'files.x'.size: expected a non-neg"),
    (_with_file("x", {"size": True, "sha256": DIGEST}), "field 'files.x'.size: expected a non-neg"),
    (_with_file("x", {"size": "1", "sha256": DIGEST}), "field 'files.x'.size: expected a non-neg"),
    (_with_file("x", {"size": 1}), "field 'files.x'.sha256: expected 64 hex digits"),
    (_with_file("x", {"size": 1, "sha256": "AB" * 32}), "field 'files.x'.sha256: expected 64 hex"),
    (_with_file("x", {"size": 1, "sha256": 5}), "field 'files.x'.sha256: expected 64 hex digits"),
    (_with_file("x", {"size": 1, "sha256": DIGEST + "\n"}), "field 'files.x'.sha256: expected 64"),
    (_with("channel", "stable"), "unknown field(s): channel"),
]


@pytest.mark.parametrize(("doc", "message"), CASES, ids=[m for _, m in CASES])
def test_rejections_name_source_and_field(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestError, match="^" + re.escape(f"src.json: {message}")):
        parse(doc, "src.json")


def test_several_unknown_fields_are_all_named_sorted() -> None:
    doc = valid()
    doc["zeta"] = 1
    doc["alpha"] = 2
    with pytest.raises(ManifestError, match=r"unknown field\(s\): alpha, zeta$"):
        parse(doc, "src.json")


def test_manifest_error_is_a_value_error() -> None:
    assert issubclass(ManifestError, ValueError)


def test_hash_file_and_describe(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000
    (tmp_path / "root.erofs").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    entry = hash_file(tmp_path / "root.erofs", chunk=1000)  # many chunks, a partial last one
    assert entry == FileEntry(len(data), hashlib.sha256(data).hexdigest())
    assert describe({"a": tmp_path / "root.erofs", "b": tmp_path / "empty"}) == {
        "a": entry,
        "b": FileEntry(0, hashlib.sha256(b"").hexdigest()),
    }


def test_hash_file_copies_exactly_the_bytes_it_hashes(tmp_path: Path) -> None:
    data = os.urandom(5000)
    (tmp_path / "uki.efi").write_bytes(data)
    copy = io.BytesIO()
    entry = hash_file(tmp_path / "uki.efi", chunk=1024, copy_to=copy)
    assert entry == FileEntry(len(data), hashlib.sha256(data).hexdigest())
    assert copy.getvalue() == data
