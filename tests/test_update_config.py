"""updater.config: image defaults, operator overrides, and errors that name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from updater.config import ConfigError, Strategy, UpdateConfig, load_config, reload_config

DEFAULTS = '[update]\nurl = "https://updates.example/berth"\nchannel = "stable"\n'


@pytest.fixture
def paths(tmp_path: Path) -> tuple[Path, Path]:
    default = tmp_path / "usr/lib/berth/update.toml"
    default.parent.mkdir(parents=True)
    default.write_text(DEFAULTS)
    return default, tmp_path / "etc/berth/update.toml"


def override(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_image_defaults_alone(paths: tuple[Path, Path]) -> None:
    config = load_config(*paths)
    assert config == UpdateConfig("https://updates.example/berth/", "stable")
    assert (config.strategy, config.interval) == (Strategy.IMMEDIATE, 3600.0)
    assert config.metadata_url == "https://updates.example/berth/metadata/"


@pytest.mark.parametrize(
    ("interval", "seconds"), [('"1h"', 3600), ('"30m"', 1800), ('"3600"', 3600), ("90", 90)]
)
def test_overrides_win_key_by_key(paths: tuple[Path, Path], interval: str, seconds: int) -> None:
    default, etc = paths
    override(etc, f'[update]\nchannel = "beta"\nstrategy = "off"\ninterval = {interval}\n')
    config = load_config(default, etc)
    assert (config.url, config.channel) == ("https://updates.example/berth/", "beta")
    assert (config.strategy, config.interval) == (Strategy.OFF, seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[update]\nstrategy = "sometimes"\n',
            "key 'update.strategy': expected one of immediate, off",
        ),
        ('[update]\ninterval = "10s"\n', "key 'update.interval': expected at least 60 seconds"),
        ('[update]\ninterval = "soon"\n', "key 'update.interval': expected a duration"),
        ('[update]\nurl = "ftp://x"\n', "key 'update.url': expected an http:// or https:// URL"),
        ('[update]\nchannel = "Stable!"\n', "key 'update.channel': expected a channel name"),
        ('[update]\nchanel = "beta"\n', "unknown key 'update.chanel'"),
        ('[reboot]\nwindow = "sun"\n', "unknown table or key 'reboot'"),
        ("update = 3\n", "'update' must be a table"),
        ("[update\n", "not valid TOML"),
    ],
)
def test_malformed_override_names_file_key_and_expectation(
    paths: tuple[Path, Path], text: str, message: str
) -> None:
    default, etc = paths
    override(etc, text)
    with pytest.raises(ConfigError, match=f"^{etc}: ") as info:
        load_config(default, etc)
    assert message in str(info.value)


def test_a_test_may_poll_faster(paths: tuple[Path, Path]) -> None:
    default, etc = paths
    override(etc, '[update]\ninterval = "5s"\n')
    assert load_config(default, etc, min_interval=1).interval == 5


def test_missing_defaults_and_missing_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "none.toml", tmp_path / "etc.toml")
    default = tmp_path / "d.toml"
    default.write_text('[update]\nchannel = "stable"\n')
    with pytest.raises(ConfigError, match=r"key 'update\.url' is missing"):
        load_config(default, tmp_path / "etc.toml")


def test_reload_keeps_the_last_good_config(paths: tuple[Path, Path]) -> None:
    default, etc = paths
    good = load_config(default, etc)
    override(etc, '[update]\nstrategy = "never"\n')
    config, error = reload_config(good, default, etc)
    assert config is good and error is not None and "update.strategy" in str(error)
    override(etc, '[update]\nstrategy = "off"\n')
    config, error = reload_config(good, default, etc)
    assert error is None and config.strategy is Strategy.OFF


def test_an_image_without_a_repository_loads_and_can_be_given_one(
    paths: tuple[Path, Path],
) -> None:
    default, etc = paths
    default.write_text('[update]\nurl = ""\nchannel = "stable"\n')
    assert load_config(default, etc).url == ""
    override(etc, '[update]\nurl = "https://mirror.example/berth"\n')
    assert load_config(default, etc).url == "https://mirror.example/berth/"
