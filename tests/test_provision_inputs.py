"""Hostile provisioning input: every parser answers with a ProvisionError naming the source and
the field, never another exception, and never echoes a password or an unbounded value."""

from __future__ import annotations

import json

import pytest

from updater.provision.__main__ import parse_config
from updater.provision.plan import SHOWN_LENGTH, ProvisionError, field_error
from updater.provision.sources import parse_nocloud_meta, parse_openstack_meta

SOURCE = "test input"
HUGE_INT = "1" + "0" * 5000  # past Python's 4300-digit limit for int(str)


def refusal(data: bytes) -> str:
    with pytest.raises(ProvisionError) as info:
        parse_config(data, SOURCE)
    return str(info.value)


def ignition(**sections: object) -> bytes:
    return json.dumps({"ignition": {"version": "3.4.0"}, **sections}).encode()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"#cloud-config\nhostname: \xff\n", "cloud-config is not UTF-8 text (byte 24)"),
        (b'#cloud-config\nhostname: "\\ud800"\n', "hostname: expected text that is valid Unicode"),
        (
            b'#cloud-config\nwrite_files: [{path: /etc/a, content: "\\udc80"}]\n',
            "write_files[0].content: expected text that is valid Unicode",
        ),
        (b'#cloud-config\n"\\ud800": 1\n', "(top level): expected text that is valid Unicode"),
        (b"#cloud-config\nrun: " + b"[" * 5000 + b"]" * 5000, "not valid YAML: nested too deep"),
        (b"#cloud-config\nhostname: " + HUGE_INT.encode(), "not valid YAML: Exceeds the limit"),
        (b"#cloud-config\nhostname: 2001-13-45\n", "not valid YAML: month must be in 1..12"),
        (b"#cloud-config\n? [a]\n: b\n", "cloud-config is not valid YAML"),
        (b"#cloud-config\n1: b\n", "cloud-config: expected keys that are strings, got 1"),
        (
            b"#cloud-config\nusers:\n  - name: a\n    ? 0x" + b"f" * 4000 + b"\n    : 1\n",
            "users[0].<an integer of 4000 hex digits>: not supported",
        ),
        (
            b"#cloud-config\nwrite_files: [{path: /etc/a, 2001-01-01: 1}]\n",
            "write_files[0].datetime.date(2001, 1, 1): not supported",
        ),
        (
            b"#cloud-config\nruncmd: [[sleep, 0x" + b"f" * 4000 + b"]]\n",
            "runcmd[0][1]: expected a string, got <an integer of 4000 hex digits>",
        ),
        # An alias bomb: a billion strings by reference, shown in a few characters.
        (
            b"#cloud-config\na: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a]\n"
            b"c: &c [*b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c]\n"
            b"users: [[*d, *d, *d, *d, *d, *d]]\n",
            "a: not supported",
        ),
        (
            b"#cloud-config\nb: &b [*b]\nusers: [[*b, *b]]\n",  # a self-referencing alias
            "b: not supported",
        ),
        (b'{"ignition": {"version": "3.4.0\xff"}}', "not UTF-8 text"),
        (
            ignition(storage={"files": [{"path": "/etc/" + "a" * 256}]}),
            "storage.files[0].path: expected a path shorter than 4096 bytes, each name at most 255",
        ),
        (
            ignition(storage={"links": [{"path": "/etc/l", "target": "a/" * 3000}]}),
            "storage.links[0].target: expected a link target shorter than 4096 bytes",
        ),
        (
            ignition(systemd={"units": [{"name": "a" * 300 + ".service"}]}),
            "systemd.units[0].name: expected a unit name",
        ),
        (
            b"#cloud-config\nwrite_files: [{path: /etc/" + b"a/" * 3000 + b"b}]\n",
            "write_files[0].path: expected a path shorter than 4096 bytes",
        ),
        (
            b'{"ignition": {"version": "3.4.0"}, "storage": {"files": [{"path": "/etc/\\ud800"}]}}',
            "storage.files[0].path: expected text that is valid Unicode",
        ),
        (b'{"ignition": {"version": "3.4.0"}, "x": ' + HUGE_INT.encode() + b"}", "not valid JSON"),
        (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "not valid JSON: nested too deeply"),
    ],
)
def test_hostile_input_is_refused_with_a_provision_error(data: bytes, expected: str) -> None:
    message = refusal(data)
    assert message.startswith(SOURCE)
    assert expected in message
    assert len(message) < 600


def test_a_deep_yaml_document_that_parses_is_refused_by_field() -> None:
    deep = b"[" * 300 + b"]" * 300
    assert "runcmd[0][0]: expected a string" in refusal(b"#cloud-config\nruncmd: [" + deep + b"]")


def test_an_alias_bomb_is_reported_in_a_few_characters() -> None:
    # Ten levels of nine references each: 9**10 strings if anything walked or printed them all.
    levels = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"&a{n} [{', '.join([f'*a{n - 1}'] * 9)}]" for n in range(1, 10)]
    bomb = f"#cloud-config\nruncmd: [[x, [{', '.join(levels)}]]]\n"
    message = refusal(bomb.encode())
    assert "runcmd[0][1]: expected a string, got [[" in message
    assert len(message) < 200


@pytest.mark.parametrize(
    "meta",
    [b'local-hostname: "\\ud800"\n', b"instance-id: " + HUGE_INT.encode() + b"\n", b"a: [" * 3000],
)
def test_nocloud_meta_data_faults_are_provision_errors(meta: bytes) -> None:
    with pytest.raises(ProvisionError, match=r"^meta-data: "):
        parse_nocloud_meta(meta, "meta-data")


@pytest.mark.parametrize(
    "meta", [b'{"hostname": "\\ud800"}', b"\xff", b"[" * 100_000, b'{"uuid": ' + HUGE_INT.encode()]
)
def test_openstack_meta_data_faults_are_provision_errors(meta: bytes) -> None:
    with pytest.raises(ProvisionError, match=r"^meta_data\.json: "):
        parse_openstack_meta(meta, "meta_data.json")


def test_messages_show_a_bounded_value() -> None:
    recursive: list[object] = []
    recursive.append(recursive)
    for value in ("x" * 10_000, list(range(10_000)), recursive, int("f" * 5000, 16)):
        message = str(field_error("s", "p", "nothing", value))
        assert len(message) <= len("s: p: expected nothing, got ") + SHOWN_LENGTH


@pytest.mark.parametrize(
    "data",
    [
        ignition(passwd={"users": [{"name": "core", "passwordHash": "hunter2-secret"}]}),
        b"#cloud-config\nusers: [{name: core, passwd: hunter2-secret, lock_passwd: false}]\n",
    ],
)
def test_a_plain_text_password_is_refused_by_both_formats_and_not_shown(data: bytes) -> None:
    message = refusal(data)
    assert "expected a crypt(3) hash" in message
    assert "hunter2" not in message


@pytest.mark.parametrize("value", ["$6$salt$hash", "$y$j9T$salt$hash", "!", "*", "!$6$s$h"])
def test_crypt_hashes_and_locked_forms_pass_in_ignition(value: str) -> None:
    plan = parse_config(ignition(passwd={"users": [{"name": "a", "passwordHash": value}]}), "s")
    assert plan is not None and plan.users[0].password_hash == value
