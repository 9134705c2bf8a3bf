"""Fuzzing what the builder reads from a checkout: image definitions (images/*.toml) and an
overlay's `.modes` file. Each returns a value or raises ConfigError naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import example, given

from builder.config import load_image
from builder.errors import ConfigError
from tests.support.fuzzing import documents, fuzz, refuses_cleanly, to_toml

pytestmark = fuzz

BASE = """
suite = "trixie"
overlays = ["base"]
packages = ["systemd", "curl"]
[partitions]
root = "256M"
"""
IMAGE = {
    "description": "a fuzzed image",
    "extends": "base",
    "suite": "trixie",
    "mirror": "http://mirror.example/debian",
    "packages": ["podman", "-curl"],
    "overlays": ["base", "extra"],
    "cmdline": ["panic=10", "console=ttyS0,115200"],
    "compression": "zstd",
    "formats": ["raw", "qcow2"],
    "partitions": {"esp": "1G", "root": "2G", "verity": "128M", "state": 536870912},
    "update": {"channel": "stable", "url": "https://updates.example/berth"},
    "variables": {"motd": "hello"},
}


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "base.toml").write_text(BASE)
    for overlay in ("base", "extra"):
        (tmp_path / "overlays" / overlay).mkdir(parents=True)
    return tmp_path


def test_the_valid_definition_loads(checkout: Path) -> None:
    (checkout / "images" / "fuzz.toml").write_text(to_toml(IMAGE))
    image = load_image("fuzz", checkout / "images")
    assert image.packages == ("systemd", "podman")


# Arrays nested 50000 deep: tomllib's RecursionError escaped.
@example(b"description = " + b"[" * 50_000 + b"]" * 50_000)
# An integer over int()'s 4300-digit limit: a bare ValueError escaped through tomllib.
@example(b"description = 1" + b"0" * 5000)
# A size of 5000 digits: the size's int() raised ValueError.
@example(b'[partitions]\nroot = "' + b"9" * 5000 + b'M"')
@given(documents(IMAGE, to_toml))
def test_image_definition(checkout: Path, data: bytes) -> None:
    (checkout / "images" / "fuzz.toml").write_bytes(data)
    refuses_cleanly(
        lambda: load_image("fuzz", checkout / "images"), ConfigError, ("images/fuzz.toml",)
    )
