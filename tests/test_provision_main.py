"""berth-provision's front end: format dispatch, --check, and the meta-data hostname."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from updater.provision.__main__ import _nobody_can_log_in, _with_meta_hostname, main, parse_config
from updater.provision.plan import Plan

IGNITION = json.dumps(
    {
        "ignition": {"version": "3.4.0"},
        "storage": {"files": [{"path": "/etc/x", "contents": {"source": "data:,x"}}]},
    }
).encode()


def test_each_format_goes_to_its_parser() -> None:
    ignition = parse_config(IGNITION, "fw_cfg")
    assert ignition is not None and ignition.format == "ignition"
    assert ignition.files[0].contents == b"x"
    # Clouds allow gzip'd user-data; the Ignition parser gets the JSON itself.
    zipped = parse_config(gzip.compress(IGNITION), "EC2")
    assert zipped is not None and zipped.files == ignition.files
    cloud = parse_config(b"#cloud-config\nhostname: web-1\n", "drive")
    assert cloud is not None and (cloud.format, cloud.hostname) == ("cloud-config", "web-1")
    script = parse_config(b"#!/bin/sh\ntrue\n", "drive")
    assert script is not None and script.script == b"#!/bin/sh\ntrue\n"
    assert parse_config(b"  \n", "drive") is None


def test_meta_data_names_the_host_only_when_the_config_does_not() -> None:
    plain = Plan(source="s", format="script")
    assert _with_meta_hostname(plain, {"local-hostname": "ip-10-0-0-5.ec2.internal"}).hostname == (
        "ip-10-0-0-5"
    )
    named = Plan(source="s", format="cloud-config", hostname="web-1")
    assert _with_meta_hostname(named, {"local-hostname": "other"}).hostname == "web-1"
    assert _with_meta_hostname(plain, {"local-hostname": "not a name!"}).hostname is None


def test_check_validates_without_applying(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "config.ign"
    good.write_bytes(IGNITION)
    assert main(["--check", str(good)]) == 0
    assert "valid ignition" in capsys.readouterr().out
    bad = tmp_path / "bad.ign"
    bad.write_text(
        '{"ignition": {"version": "3.4.0"}, "storage": {"disks": [{"device": "/dev/sdb"}]}}'
    )
    assert main(["--check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "storage.disks: not supported" in out
    assert "the boot stops here" not in out  # a check is not a boot


def test_root_keys_in_any_encoding_count_as_a_login(tmp_path: Path) -> None:
    keys = tmp_path / "root/.ssh/authorized_keys"
    keys.parent.mkdir(parents=True)
    keys.write_bytes(b"ssh-ed25519 AAAA caf\xe9\n")  # Latin-1 in the comment
    assert _nobody_can_log_in(tmp_path).startswith("root logs in")
