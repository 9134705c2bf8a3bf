"""Fuzzing what the builder reads from a checkout: image definitions (images/*.toml) and an
overlay's `.modes` file. Each returns a value or raises ConfigError naming the file."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from builder.config import load_image
from builder.errors import ConfigError
from builder.overlay import MODES_FILE, apply_overlay
from tests.support.fuzzing import documents, fuzz, refuses_cleanly, to_toml, weird_value

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


MODES = [
    ["/etc/motd", "0600", "berth", "berth"],
    ["/etc", "0755", "root", "wheel"],
    ["# the files that are not root's 0644"],
    ["/usr/bin/tool", "4755", "root", "root", "# setuid"],
]
TEMPLATE = ["Hello {{ name }}", "\n", "{% if flag %}", "on", "{% endif %}", "\n"]
# What a template writer gets wrong, besides the weird values every fuzzer tries. Templates are
# the checkout's own: one that asks for a billion-item list is slow on purpose, not refused.
JINJA = st.sampled_from(
    [
        "{{",
        "}}",
        "{%",
        "%}",
        "{#",
        "{% for x in %}",
        "{{ nosuch }}",
        "{{ name|nosuchfilter }}",
        "{{ 1/0 }}",
        "{{ name + 1 }}",
        "{{ name.attr.deeper }}",
        "{{ name[99] }}",
        "{% raw %}",
        "{{ '%d' % name }}",
    ]
)


def render_modes(doc: object) -> str:
    lines = doc if isinstance(doc, list) else [doc]
    return "\n".join(
        " ".join(str(word) for word in line) if isinstance(line, list) else str(line)
        for line in lines
    )


def render_template(doc: object) -> str:
    return "".join(str(part) for part in doc) if isinstance(doc, list) else str(doc)


def tree_and_overlay(root: Path) -> tuple[Path, Path]:
    tree, overlay = root / "tree", root / "overlay"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nberth:x:4242:4343::/:/bin/sh\n")
    (tree / "etc/group").write_text("root:x:0:\nberth:x:4343:\nwheel:x:4444:berth\n")
    (overlay / "etc").mkdir(parents=True)
    (overlay / "usr/bin").mkdir(parents=True)
    (overlay / "etc/motd").write_text("hello\n")
    (overlay / "usr/bin/tool").write_text("#!/bin/sh\n")
    return tree, overlay


# A mode of "-1": int("-1", 8) is -1, and chmod(-1) set 07777, setuid and all.
@example(b"/etc/motd -1 root root\n")
# A path with a NUL: os.readlink raised ValueError while resolving it in the tree.
@example(b"/etc/mo\x00td 0600 root root\n")
@given(documents(MODES, render_modes))
def test_overlay_modes_file(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        tree, overlay = tree_and_overlay(Path(scratch))
        (overlay / MODES_FILE).write_bytes(data)
        outcome = refuses_cleanly(
            lambda: apply_overlay(overlay, tree, {}), ConfigError, (MODES_FILE,)
        )
        if not isinstance(outcome, ConfigError):
            # Accepted: then every mode was octal digits, as chmod(1) reads them.
            for line in data.decode().splitlines():
                words = line.split("#", 1)[0].split()
                assert not words or re.fullmatch("[0-7]+", words[1]), line


# Errors raised while rendering: ZeroDivisionError, jinja2's TemplateRuntimeError.
@example(b"{{ 0/0 }}")
@example(b"{% if flag %}{{ 0|A }}{% endif %}")
# Brackets nested 1000 deep: jinja2's parser raised RecursionError.
@example(b"{{ " + b"[" * 1000 + b" }}")
# Not UTF-8: read_text() raised UnicodeDecodeError.
@example(b"Hello \xff {{ name }}\n")
@given(documents(TEMPLATE, render_template, weird_value | JINJA))
def test_overlay_template(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        tree, overlay = tree_and_overlay(Path(scratch))
        (overlay / "etc/issue.j2").write_bytes(data)
        variables = {"name": "berth", "flag": True}
        refuses_cleanly(
            lambda: apply_overlay(overlay, tree, variables), ConfigError, ("etc/issue.j2",)
        )
