"""Files the build writes into an image and the agent reads on the machine: the bytes the builder
writes are parsed with the agent's own reader, so that a value with a quote, a backslash, a
newline or a '%' either reads back as itself or is refused at build time naming the image
definition and the key (docs/building.md, "What the image carries")."""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from builder.config import ImageConfig, UpdateSettings, load_image
from builder.errors import BuildError, ConfigError
from builder.image import os_release, update_defaults
from builder.tomlwrite import toml_string, toml_table
from updater.config import ConfigError as AgentConfigError
from updater.config import load_config, parse_defaults
from updater.release.osrelease import format_os_release, parse_os_release
from updater.release.version import Version
from updater.update.context import read_os_release

NASTY = ['a"b', "back\\slash", "new\nline", "100%", "tab\there", "del\x7f", "ünï", "'", "$x`y`"]


@pytest.mark.parametrize("value", NASTY)
def test_a_toml_string_reads_back_as_itself(value: str) -> None:
    assert tomllib.loads(toml_table("t", {"k": value, "n": 3, "b": True})) == {
        "t": {"k": value, "n": 3, "b": True}
    }
    assert tomllib.loads(f"k = {toml_string(value)}")["k"] == value


def test_a_lone_surrogate_is_refused() -> None:
    with pytest.raises(ValueError, match="surrogate"):
        toml_string("\ud800")


@pytest.mark.parametrize("value", [v for v in NASTY if v.isprintable()])
def test_an_os_release_value_reads_back_as_itself(value: str) -> None:
    assert parse_os_release(format_os_release({"PRETTY_NAME": value})) == {"PRETTY_NAME": value}


@pytest.mark.parametrize("value", ["new\nline", "tab\there", "cr\r"])
def test_an_os_release_value_of_more_than_one_line_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="os-release PRETTY_NAME: expected one line"):
        format_os_release({"PRETTY_NAME": value})


def test_os_release_as_systemd_writes_and_reads_it() -> None:
    text = '# comment\nNAME=Debian\nID=\'deb ian\'\nX="a\\"b\\q"\nnot a line\n\nlower=1\n'
    assert parse_os_release(text) == {"NAME": "Debian", "ID": "deb ian", "X": 'a"b\\q'}


def test_the_images_os_release_is_what_the_agent_reads(tmp_path: Path) -> None:
    config = ImageConfig(name="containerhost", path=tmp_path / "containerhost.toml")
    path = tmp_path / "os-release"
    path.write_text(os_release(config, Version(2025, 1122, 3)))
    fields = read_os_release(path)
    assert (fields["IMAGE_ID"], fields["IMAGE_VERSION"]) == ("containerhost", "2025.1122.3")
    assert fields["PRETTY_NAME"] == "Berth 2025.1122.3 (containerhost)"


def test_an_os_release_that_is_not_utf8_is_the_agents_error(tmp_path: Path) -> None:
    from updater.errors import UpdateError

    path = tmp_path / "os-release"
    path.write_bytes(b'IMAGE_ID="a\xff"\n')
    with pytest.raises(UpdateError, match=f"^{path}: not UTF-8 text \\(byte 11\\)"):
        read_os_release(path)


def _write(images: Path, text: str) -> None:
    images.mkdir(exist_ok=True)
    (images.parent / "overlays").mkdir(exist_ok=True)
    (images / "foo.toml").write_text(text)


@pytest.mark.parametrize(
    "url",
    [
        "https://u.example/a%20b/?x=1&y='2'",
        "http://[::1]:8080/repo/",
        "https://u.example",
        "https://user:p%40ss@u.example:8443/repo/",
    ],
)
def test_the_images_update_toml_is_what_the_agent_reads(tmp_path: Path, url: str) -> None:
    images = tmp_path / "images"
    _write(images, f'[update]\nurl = "{url}"\nchannel = "beta_1"\n')
    config = load_image("foo", images)
    defaults = tmp_path / "update.toml"
    defaults.write_text(update_defaults(config))
    agent = load_config(defaults, tmp_path / "no-override.toml")
    assert agent.url == url if url.endswith("/") else agent.url == url + "/"
    assert agent.channel == "beta_1"


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("url = 'https://u.example/\"x'", "update.url"),
        ('url = "https://u.example/a\\\\b"', "update.url"),
        ('url = "https://u.example/\\nx"', "update.url"),
        ('url = "https://u.exämple/"', "update.url"),
        ('channel = "beta\\n"', "update.channel"),
        ('channel = "100%"', "update.channel"),
        ('interval = "1h"', "update.interval"),  # not an image definition's key
    ],
)
def test_update_values_the_agent_refuses_are_refused_at_build_time(
    tmp_path: Path, line: str, key: str
) -> None:
    images = tmp_path / "images"
    _write(images, f"[update]\n{line}\n")
    with pytest.raises(ConfigError) as info:
        load_image("foo", images)
    assert str(info.value).startswith(f"images/foo.toml: unknown key '{key}'") or str(
        info.value
    ).startswith(f"images/foo.toml: key '{key}': expected")


def test_a_value_past_the_image_definition_is_still_checked_when_written(tmp_path: Path) -> None:
    # An ImageConfig made in code skips the definition's checks; the written file is checked by
    # the agent's parser all the same.
    config = replace(
        ImageConfig(name="foo", path=tmp_path / "foo.toml"),
        update=UpdateSettings(channel="Not a channel", url=""),
    )
    with pytest.raises(BuildError, match=r"foo\.toml: the \[update\] table makes an update\.toml"):
        update_defaults(config)


def test_parse_defaults_names_the_source() -> None:
    with pytest.raises(AgentConfigError, match=r"^x\.toml: key 'update\.url' is missing"):
        parse_defaults('[update]\nchannel = "stable"\n', "x.toml")
