"""One JSON-object parser for the release format and the agent's own files: every malformed input
is the reader's documented error, never RecursionError or UnicodeDecodeError escaping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from updater.release import channel
from updater.release.document import json_object
from updater.release.manifest import Manifest, ManifestError
from updater.update.fetch import _load_state
from updater.update.state import State, load_state, save_state

DEEP = "[" * 100_000 + "]" * 100_000


class Refused(Exception):
    pass


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (DEEP, "nested too deeply"),
        ('{"a": ' * 50_000 + "1" + "}" * 50_000, "nested too deeply"),
        (b'{"a": "\xff"}', "not UTF-8 text"),
        # Found by tests/test_fuzz_release.py: int()'s digit limit raised a bare ValueError.
        ('{"size": 1' + "0" * 5000 + "}", "not valid JSON: Exceeds the limit"),
        ("{", "not valid JSON"),
        ('{"a": ' + "9" * 5000 + "}", "not valid JSON: Exceeds the limit"),
        ('{"a": NaN}', "not valid JSON: NaN is not a JSON number"),
        ('{"a": -Infinity}', "not valid JSON: -Infinity is not a JSON number"),
        ("[1]", "expected a JSON object at the top level"),
        ("null", "expected a JSON object at the top level"),
    ],
)
def test_malformed_documents_are_the_callers_error(text: str | bytes, message: str) -> None:
    with pytest.raises(Refused, match=f"^doc.json: .*{message}"):
        json_object(text, "doc.json", Refused)


def test_an_object_is_returned_as_parsed() -> None:
    assert json_object(b'{"a": [1, {"b": null}]}', "doc.json", Refused) == {"a": [1, {"b": None}]}


def test_a_deeply_nested_release_manifest_is_refused_naming_it() -> None:
    with pytest.raises(ManifestError, match=r"^2\.0\.0 manifest.json: .*nested too deeply"):
        Manifest.from_json(DEEP, "2.0.0 manifest.json")


def test_a_deeply_nested_channel_manifest_is_refused_naming_it() -> None:
    with pytest.raises(channel.ChannelError, match=r"^channels/stable: .*nested too deeply"):
        channel.parse(DEEP, "channels/stable")


@pytest.mark.parametrize(
    "content", [DEEP.encode(), b"\xff\xfe\x00garbage", b'{"format": 1, "x": "\xc3"}']
)
def test_a_corrupt_state_file_is_set_aside_not_a_crash(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    assert load_state(path) == State()
    assert not path.exists() and len(list(tmp_path.glob("state.json.corrupt-*"))) == 1
    save_state(path, State(seed=7))  # and the agent goes on with a fresh one
    assert load_state(path) == State(seed=7)


@pytest.mark.parametrize("content", [DEEP.encode(), b"\xff\xfe", json.dumps([1]).encode()])
def test_a_corrupt_download_record_restarts_the_download(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "download-root.erofs.json"
    path.write_bytes(content)
    assert _load_state(path, "0" * 64, 4096, 0) == 0


def test_a_file_size_past_1_tib_is_refused_naming_the_field() -> None:
    doc = {
        "image": "c",
        "version": "1.0.0",
        "arch": "x86_64",
        "roothash": "a" * 64,
        "files": {"root.erofs": {"size": 2**63, "sha256": "b" * 64}},
    }
    with pytest.raises(ManifestError, match=r"^m: field 'files.root.erofs'.size: .*1 TiB"):
        Manifest.from_json(json.dumps(doc), "m")


def test_a_version_of_thousands_of_digits_is_refused_as_a_version() -> None:
    doc = {"image": "c", "version": "1." + "9" * 5000 + ".0", "arch": "x", "roothash": "a" * 64}
    with pytest.raises(ManifestError, match=r"^m: field 'version': version .* is not MAJOR"):
        Manifest.from_json(json.dumps({**doc, "files": {}}), "m")


def test_a_wave_bound_of_thousands_of_digits_is_refused_as_a_bound() -> None:
    with pytest.raises(
        channel.ChannelError, match=r"wave bound .9999.*expected an integer 1\.\.2048"
    ):
        channel.parse_waves({"9" * 5000: "2025-01-01T00:00:00Z"}, "w")


def test_a_channel_document_that_is_not_utf8_is_a_channel_error() -> None:
    with pytest.raises(channel.ChannelError, match=r"^c: not UTF-8 text"):
        channel.parse(b'{"channel": "\xff"}', "c")
