"""updater.config: image defaults, operator overrides, and errors that name file and key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
        # Found by tests/test_fuzz_provision.py: float() raised OverflowError.
        (f"[update]\ninterval = {10**400}\n", "key 'update.interval': expected at most 31 days"),
        (f'[update]\nreboot_delay = "{10**400}s"\n', "key 'update.reboot_delay': expected"),
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
    # A TOML syntax error names the line and column too, as a compiler would: path:line:col.
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(etc))}(:\d+:\d+)?: ") as info:
        load_config(default, etc)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # Found by tests/test_fuzz_provision.py: each escaped _read as another exception.
        (b'[update]\nchannel = "b\xffta"\n', "not UTF-8 text (byte 21)"),
        (b"x = " + b"[" * 50_000 + b"]" * 50_000, "not valid TOML: nested too deeply"),
        (b"[update]\ninterval = 1" + b"0" * 5000, "not valid TOML: Exceeds the limit"),
    ],
)
def test_an_unreadable_override_names_the_file(
    paths: tuple[Path, Path], data: bytes, message: str
) -> None:
    default, etc = paths
    etc.parent.mkdir(parents=True)
    etc.write_bytes(data)
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


def test_reboot_coordination_tables(paths: tuple[Path, Path]) -> None:
    default, etc = paths
    override(
        etc,
        '[update]\nstrategy = "etcd-lock"\nreboot_delay = "2m"\n'
        '[etcd_lock]\nendpoints = ["https://etcd1:2379/", "https://etcd2:2379"]\n'
        'group = "workers"\nslots = 2\nca_file = "/etc/berth/ca.pem"\n'
        'cert_file = "/etc/berth/c.pem"\nkey_file = "/etc/berth/k.pem"\n'
        '[fleet_lock]\nbase_url = "http://lockd:8080/base"\n'
        '[[window]]\ndays = ["Sat"]\nstart_time = "23:00"\nlength_minutes = 90\n'
        'time_zone = "Europe/Berlin"\n',
    )
    config = load_config(default, etc)
    assert config.strategy is Strategy.ETCD_LOCK and config.reboot_delay == 120
    assert config.etcd_endpoints == ("https://etcd1:2379", "https://etcd2:2379")
    assert (config.etcd_group, config.etcd_slots) == ("workers", 2)
    assert config.etcd_ca_file == Path("/etc/berth/ca.pem")
    assert config.fleet_lock_url == "http://lockd:8080/base/"
    assert config.fleet_lock_group == "default"
    assert [str(w) for w in config.windows] == ["Sat 23:00 for 90 min (Europe/Berlin)"]


def test_windows_in_the_override_replace_the_images(paths: tuple[Path, Path]) -> None:
    default, etc = paths
    window = '[[window]]\ndays = ["{}"]\nstart_time = "01:00"\nlength_minutes = 30\n'
    default.write_text(DEFAULTS + window.format("Mon"))
    override(etc, '[update]\nstrategy = "window"\n' + window.format("Tue") + window.format("Wed"))
    config = load_config(default, etc)
    assert [sorted(w.days) for w in config.windows] == [[1], [2]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[update]\nstrategy = "window"\n', 'strategy "window" needs at least one [[window]]'),
        ('[update]\nstrategy = "fleet-lock"\n', "needs key 'fleet_lock.base_url'"),
        ('[update]\nstrategy = "etcd-lock"\n', "needs key 'etcd_lock.endpoints'"),
        ('[update]\nstrategy = "periodic"\n', "expected one of immediate, off, window"),
        ('[update]\nreboot_delay = "later"\n', "key 'update.reboot_delay': expected a duration"),
        ('[fleet_lock]\nbase_url = "lockd:8080"\n', "key 'fleet_lock.base_url': expected an http"),
        ('[fleet_lock]\ngroup = "a b"\n', "key 'fleet_lock.group': expected a group name"),
        ("[etcd_lock]\nendpoints = []\n", "key 'etcd_lock.endpoints': expected a list"),
        ('[etcd_lock]\nendpoints = ["etcd:2379"]\n', "key 'etcd_lock.endpoints': expected http"),
        ("[etcd_lock]\nslots = 0\n", "key 'etcd_lock.slots': expected a whole number"),
        ('[etcd_lock]\nca_file = "ca.pem"\n', "key 'etcd_lock.ca_file': expected an absolute"),
        ('[etcd_lock]\ncert_file = "/c.pem"\n', "'etcd_lock.cert_file' and 'etcd_lock.key_file'"),
        ('[etcd_lock]\nendpoint = "x"\n', "unknown key 'etcd_lock.endpoint'"),
        ("[window]\ndays = 1\n", "'window' must be an array of tables ([[window]])"),
        (
            '[[window]]\ndays = ["Mon"]\nstart_time = "01:00"\nlength_minutes = 5\n'
            '[[window]]\ndays = ["Mon"]\nstart_time = "25:00"\nlength_minutes = 5\n',
            "[[window]] number 2: key 'start_time'",
        ),
        (
            "[updates]\nstrategy = 1\n",
            "known tables: [update], [fleet_lock], [etcd_lock], [[window]]",
        ),
    ],
)
def test_reboot_coordination_rejections_name_file_and_field(
    paths: tuple[Path, Path], text: str, message: str
) -> None:
    # The same check as for the [update] keys, over the reboot coordination tables.
    test_malformed_override_names_file_key_and_expectation(paths, text, message)


def test_a_strategy_chosen_by_the_image_is_blamed_on_the_image(paths: tuple[Path, Path]) -> None:
    default, etc = paths
    default.write_text(DEFAULTS + 'strategy = "fleet-lock"\n')
    with pytest.raises(ConfigError, match=f'^{default}: strategy "fleet-lock" needs'):
        load_config(default, etc)
    override(etc, '[fleet_lock]\nbase_url = "http://lockd/"\n')
    assert load_config(default, etc).strategy is Strategy.FLEET_LOCK


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'[update]\nchannel = "b\xe9ta"\n', "not UTF-8 text (byte 21)"),
        (b"[update]\nx = " + b"[" * 5000 + b"]" * 5000, "not valid TOML: nested too deeply"),
        (b"a = " + b"{b = " * 3000 + b"1" + b"}" * 3000, "not valid TOML: nested too deeply"),
        (b"[update]\ninterval = " + b"9" * 5000, "not valid TOML: Exceeds the limit"),
        (b'[update]\ninterval = "' + b"9" * 5000 + b'"', "key 'update.interval': expected a"),
        (b'[update]\ninterval = "1000000000d"\n', "key 'update.interval': expected at most 31"),
        (b"[update]\ninterval = 2678401\n", "key 'update.interval': expected at most 31 days"),
        (b'[update]\nreboot_delay = "32d"\n', "key 'update.reboot_delay': expected at most 31"),
        (b"[update]\nreboot_delay = 9223372036854775808\n", "key 'update.reboot_delay'"),
        (b"[update]\nreboot_delay = -5\n", "key 'update.reboot_delay': expected at least 0"),
        (b"[update]\ninterval = 3600.0\n", "key 'update.interval': expected a duration"),
        (b"[update]\ninterval = inf\n", "key 'update.interval': expected a duration"),
        (b"[etcd_lock]\nslots = 1025\n", "key 'etcd_lock.slots': expected a whole number of"),
        (b"[etcd_lock]\nslots = 0\n", "key 'etcd_lock.slots'"),
        (b"[etcd_lock]\nslots = 2.0\n", "key 'etcd_lock.slots'"),
        (b"[update]\nurl = 'https://u.example/\"'\n", "key 'update.url': expected an http"),
        (b"[update]\nurl = 'https://u.example/a\\b'\n", "key 'update.url'"),
        (b'[update]\nurl = "https://u.example/\\u00e9"\n', "key 'update.url'"),
        (b'[update]\nurl = "https://' + b"a" * 3000 + b'/"\n', "at most 2048 characters"),
        (b"[etcd_lock]\nendpoints = ['https://e:2379\"']\n", "key 'etcd_lock.endpoints'"),
        (b'[etcd_lock]\nca_file = "/ca\\u0000"\n', "key 'etcd_lock.ca_file': expected an abs"),
        (b'[etcd_lock]\nca_file = "/ca\\n.pem"\n', "key 'etcd_lock.ca_file'"),
    ],
)
def test_bytes_and_numbers_no_parser_takes_are_config_errors(
    paths: tuple[Path, Path], data: bytes, message: str
) -> None:
    default, etc = paths
    etc.parent.mkdir(parents=True, exist_ok=True)
    etc.write_bytes(data)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(etc))}: ") as info:
        load_config(default, etc)
    assert message in str(info.value)
    assert len(str(info.value)) < 400  # a megabyte of junk is not quoted back whole


def test_the_longest_interval_is_31_days(paths: tuple[Path, Path]) -> None:
    default, etc = paths
    override(etc, '[update]\ninterval = "31d"\nreboot_delay = "0"\n')
    config = load_config(default, etc)
    assert (config.interval, config.reboot_delay) == (31 * 86400, 0)


def test_broken_defaults_on_reload_keep_the_previous_config(paths: tuple[Path, Path]) -> None:
    default, etc = paths
    good = load_config(default, etc)
    default.write_bytes(b"\xff")
    config, error = reload_config(good, default, etc)
    assert config is good
    assert error is not None and str(error).startswith(f"{default}: not UTF-8 text")


# Fragments of update.toml, right and wrong, that a generated file is put together from.
_FRAGMENTS = [
    "[update]\n",
    "[etcd_lock]\n",
    "[fleet_lock]\n",
    "[[window]]\n",
    'url = "https://u.example/"\n',
    "url = 'https://u.example/\"'\n",
    'channel = "beta"\n',
    'strategy = "etcd-lock"\n',
    'strategy = "window"\n',
    "interval = 99999999999999999\n",
    'interval = "9999999999999999999d"\n',
    "reboot_delay = -1\n",
    "slots = 3\n",
    "slots = 9.5\n",
    'endpoints = ["http://e:2379"]\n',
    'days = ["Sat"]\nstart_time = "01:00"\nlength_minutes = 60\n',
    "length_minutes = 99999999999999\n",
    'time_zone = "\\u0000"\n',
    "x = [[[[[[[[[[]]]]]]]]]]\n",
    "= \n",
    '"\n',
    "\\\n",
    "%\n",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts=st.lists(st.sampled_from(_FRAGMENTS), max_size=8),
    junk=st.binary(max_size=40),
)
def test_any_file_is_a_config_or_a_config_error(
    tmp_path_factory: pytest.TempPathFactory, parts: list[str], junk: bytes
) -> None:
    tmp = tmp_path_factory.mktemp("fuzz")
    default = tmp / "usr.toml"
    default.write_text(DEFAULTS)
    for data in ("".join(parts).encode(), "".join(parts).encode() + junk):
        (tmp / "etc.toml").write_bytes(data)
        try:
            config = load_config(default, tmp / "etc.toml")
        except ConfigError as e:
            assert str(e).startswith(f"{tmp / 'etc.toml'}")
        else:
            assert 60 <= config.interval <= 31 * 86400
            assert 0 <= config.reboot_delay <= 31 * 86400
            assert 1 <= config.etcd_slots <= 1024
