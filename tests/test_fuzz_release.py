"""Fuzzing the release formats the agent reads off the network: the channel manifest and the
release manifest. Each parser returns a value or raises its own error naming the source."""

from __future__ import annotations

from hypothesis import example, given

from tests.support.fuzzing import documents, fuzz, refuses_cleanly, to_json
from updater.release import channel
from updater.release.manifest import Manifest, ManifestError

pytestmark = fuzz

HASH = "a" * 64
CHANNEL = {
    "channel": "stable",
    "max_version": "9.0.0",
    "releases": [
        {
            "image": "containerhost",
            "arch": "x86-64",
            "version": "1.2.3",
            "roothash": HASH,
            "targets": {
                name: f"containerhost/1.2.3/{name}"
                for name in ("root.erofs", "root.verity", "uki.efi", "manifest.json")
            },
            "waves": {"102": "2025-11-22T08:00:00Z", "2048": "2025-11-23T08:00:00+01:00"},
            "pulled": False,
        }
    ],
}
MANIFEST = {
    "image": "containerhost",
    "version": "1.2.3",
    "arch": "x86-64",
    "roothash": HASH,
    "files": {name: {"size": 4096, "sha256": HASH} for name in ("root.erofs", "uki.efi")},
}


def test_the_valid_documents_parse() -> None:
    assert channel.parse(to_json(CHANNEL), "stable.json").releases
    assert Manifest.from_json(to_json(MANIFEST)).files


# An integer over int()'s 4300-digit limit: a bare ValueError escaped json_object.
@example(b"1" + b"0" * 5000)
@given(documents(CHANNEL, to_json))
def test_channel_manifest(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    refuses_cleanly(
        lambda: channel.parse(text, "channels/stable.json"),
        channel.ChannelError,
        ("channels/stable.json",),
    )


@example(b'{"files": {"uki.efi": {"size": 1' + b"0" * 5000 + b"}}}")
@given(documents(MANIFEST, to_json))
def test_release_manifest(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    refuses_cleanly(
        lambda: Manifest.from_json(text, "1.2.3 manifest.json"),
        ManifestError,
        ("1.2.3 manifest.json",),
    )
