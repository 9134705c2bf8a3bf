"""Fuzzing what a machine reads from its operator and its platform: /etc/berth/update.toml, an
Ignition config and cloud-config user-data. Each parser returns a value or raises its own error
naming the file."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import tempfile
from collections.abc import Mapping
from pathlib import Path

from hypothesis import example, given

from tests.support.fuzzing import documents, fuzz, refuses_cleanly, to_json, to_toml
from updater.config import ConfigError, load_config
from updater.provision.cloudconfig import parse_user_data
from updater.provision.ignition import parse_ignition
from updater.provision.plan import Plan, ProvisionError

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


def writable(outcome: object) -> None:
    """An accepted plan can be written: every string in it encodes as UTF-8 (a lone surrogate
    would fail only when the applier writes it, half-way through)."""
    if not isinstance(outcome, Plan):
        return
    pending: list[object] = [outcome]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            value.encode()
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            pending.extend(getattr(value, f.name) for f in dataclasses.fields(value))
        elif isinstance(value, tuple | list):
            pending.extend(value)
        elif isinstance(value, dict):
            pending.extend([*value, *value.values()])


KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtbGYM1FMgVHE1DX1d8bzqf7ICcRoM2O1ZEGMGA0jmg op@laptop"
FETCHED = b"fetched over http\n"


def fetch(url: str, headers: Mapping[str, str], /) -> bytes:
    """The fuzzers' stand-in for the network: every http(s) URL holds the same bytes."""
    return FETCHED


def data_url(data: bytes) -> str:
    return "data:;base64," + base64.b64encode(data).decode()


IGNITION = {
    "ignition": {"version": "3.4.0"},
    "passwd": {
        "users": [
            {"name": "core", "sshAuthorizedKeys": [KEY], "groups": ["wheel"]},
            {"name": "root", "sshAuthorizedKeys": [KEY]},
        ]
    },
    "storage": {
        "files": [
            {"path": "/etc/hostname", "contents": {"source": "data:,berth-1"}, "mode": 420},
            {
                "path": "/etc/app/config.toml",
                "contents": {
                    "source": data_url(gzip.compress(b"a = 1\n")),
                    "compression": "gzip",
                },
                "append": [{"source": "data:,b%20%3D%202%0A"}],
                "mode": 384,
                "overwrite": True,
            },
            {
                "path": "/var/lib/app/blob",
                "contents": {
                    "source": "https://config.example/blob",
                    "httpHeaders": [{"name": "Authorization", "value": "Bearer x"}],
                    "verification": {"hash": "sha512-" + hashlib.sha512(FETCHED).hexdigest()},
                },
            },
        ],
        "directories": [{"path": "/var/lib/app", "mode": 493}],
        "links": [{"path": "/etc/app/current", "target": "/var/lib/app/blob", "hard": False}],
    },
    "systemd": {
        "units": [
            {
                "name": "app.service",
                "enabled": True,
                "contents": (
                    "[Service]\nExecStart=/usr/bin/true\n[Install]\nWantedBy=multi-user.target\n"
                ),
                "dropins": [{"name": "10-env.conf", "contents": "[Service]\nEnvironment=A=1\n"}],
            },
            {"name": "web.container", "contents": "[Container]\nImage=docker.io/nginx\n"},
            {"name": "telnet.socket", "mask": True},
        ]
    },
}


def test_the_valid_ignition_config_parses() -> None:
    plan = parse_ignition(to_json(IGNITION).encode(), "fw_cfg", fetch=fetch)
    assert plan.hostname == "berth-1" and len(plan.files) == 2 and len(plan.units) == 3


# A lone surrogate (JSON escape \ud800) in a data: URL: UnicodeEncodeError.
@example(
    b'{"ignition": {"version": "3.4.0"}, "storage": {"files": '
    b'[{"path": "/etc/f", "contents": {"source": "data:,\\ud800"}}]}}'
)
# A lone surrogate in a unit: accepted, and only writing it would have failed.
@example(
    b'{"ignition": {"version": "3.4.0"}, "systemd": {"units": '
    b'[{"name": "a.service", "contents": "\\ud800"}]}}'
)
@given(documents(IGNITION, to_json))
def test_ignition(data: bytes) -> None:
    writable(
        refuses_cleanly(
            lambda: parse_ignition(data, "fw_cfg", fetch=fetch), ProvisionError, ("fw_cfg",)
        )
    )


CLOUD_CONFIG = {
    "hostname": "berth-1",
    "fqdn": "berth-1.example.org",
    "prefer_fqdn_over_hostname": False,
    "ssh_authorized_keys": [KEY],
    "users": [
        "default",
        {
            "name": "ops",
            "ssh_authorized_keys": [KEY],
            "groups": "wheel, users",
            "passwd": "$6$salt$" + "a" * 86,
            "lock_passwd": False,
        },
    ],
    "write_files": [
        {"path": "/etc/app.conf", "content": "a = 1\n", "permissions": "0600", "owner": "root"},
        {
            "path": "/etc/app.conf",
            "content": base64.b64encode(b"b = 2\n").decode(),
            "encoding": "b64",
            "append": True,
        },
        {
            "path": "/var/lib/app/blob.gz",
            "content": base64.b64encode(gzip.compress(b"blob")).decode(),
            "encoding": "gz+b64",
        },
    ],
    "runcmd": [["systemctl", "enable", "--now", "app.service"], "echo done > /run/done"],
}


def render_cloud_config(doc: object) -> str:
    # JSON is YAML's flow style, and keeps surrogates as escapes the YAML reader must refuse.
    return "#cloud-config\n" + to_json(doc)


def test_the_valid_cloud_config_parses() -> None:
    plan = parse_user_data(render_cloud_config(CLOUD_CONFIG).encode(), "user-data")
    assert plan is not None and plan.hostname == "berth-1" and len(plan.files) == 2


# YAML escapes of lone surrogates in a file's content: UnicodeEncodeError.
@example(b'#cloud-config\nwrite_files: [{"path": "/etc/a", "content": "\\ud800\\udc00"}]')
# An integer over int()'s 4300-digit limit: a bare ValueError escaped through PyYAML.
@example(b"#cloud-config\nhostname: 1" + b"0" * 5000)
# Lists nested 50000 deep: PyYAML's RecursionError escaped.
@example(b"#cloud-config\nhostname: " + b"[" * 50_000 + b"]" * 50_000)
# A lone surrogate in a command: accepted, and only running it would have failed.
@example(b'#cloud-config\nruncmd: ["echo \\ud800"]')
@given(documents(CLOUD_CONFIG, render_cloud_config))
def test_cloud_config(data: bytes) -> None:
    writable(
        refuses_cleanly(lambda: parse_user_data(data, "user-data"), ProvisionError, ("user-data",))
    )
