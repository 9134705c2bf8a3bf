"""Fuzzing what a machine reads from its operator and its platform: /etc/berth/update.toml, an
Ignition config and cloud-config user-data. Each parser returns a value or raises its own error
naming the file."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import example, given

from tests.support.fuzzing import documents, fuzz, refuses_cleanly, to_toml
from updater.config import ConfigError, load_config

pytestmark = fuzz

DEFAULTS = '[update]\nurl = "https://updates.example/berth/"\nchannel = "stable"\n'
UPDATE_TOML = {
    "update": {
        "url": "https://updates.example/berth",
        "channel": "beta",
        "strategy": "window",
        "interval": "30m",
        "reboot_delay": 300,
    },
    "window": [
        {"days": ["Sat", "Sun"], "start_time": "02:30", "length_minutes": 120},
        {"days": ["Wed"], "start_time": "23:00", "length_minutes": 60, "time_zone": "UTC"},
    ],
    "fleet_lock": {"base_url": "http://lockd.example:8080/", "group": "workers"},
    "etcd_lock": {
        "endpoints": ["https://etcd1:2379", "https://etcd2:2379"],
        "group": "workers",
        "slots": 2,
        "ca_file": "/etc/berth/ca.pem",
        "cert_file": "/etc/berth/client.pem",
        "key_file": "/etc/berth/client.key",
    },
}


def test_the_valid_update_toml_loads(tmp_path: Path) -> None:
    (tmp_path / "defaults.toml").write_text(DEFAULTS)
    (tmp_path / "update.toml").write_text(to_toml(UPDATE_TOML))
    config = load_config(tmp_path / "defaults.toml", tmp_path / "update.toml")
    assert len(config.windows) == 2 and config.etcd_slots == 2


# A 401-digit interval: float() raised OverflowError.
@example(b"[update]\ninterval = 1" + b"0" * 400)
# An integer over int()'s 4300-digit limit: a bare ValueError escaped through tomllib.
@example(b"[update]\ninterval = 1" + b"0" * 5000)
# Arrays nested 50000 deep: tomllib's RecursionError escaped.
@example(b"x = " + b"[" * 50_000 + b"]" * 50_000)
# Not UTF-8: tomllib's UnicodeDecodeError escaped.
@example(b"\x80")
@given(documents(UPDATE_TOML, to_toml))
def test_update_toml(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        defaults, override = Path(scratch, "defaults.toml"), Path(scratch, "update.toml")
        defaults.write_text(DEFAULTS)
        override.write_bytes(data)
        refuses_cleanly(
            lambda: load_config(defaults, override), ConfigError, (str(defaults), str(override))
        )
