"""updater.provision.ignition: every field Berth reads, every refusal, and fetching from a real
HTTP server on loopback (no mocks: the server answers, fails, stalls and comes up late for real).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import requests

from qemu.vm import free_port
from tests.support.misbehaving_server import MisbehavingServer, Misbehaviour, refusing_port
from updater.provision.http import failure_reason
from updater.provision.ignition import SPEC_VERSIONS, Fetcher, http_fetch, parse_ignition
from updater.provision.plan import Directory, Dropin, File, Link, Plan, ProvisionError, Unit, User

SOURCE = "test config"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtbGYM1FMgVHE1DX1d8bzqf7ICcRoM2O1ZEGMGA0jmg op@laptop"


def config(version: str = "3.4.0", **sections: Any) -> dict[str, Any]:
    return {"ignition": {"version": version}, **sections}


def encode(doc: object) -> bytes:
    return json.dumps(doc).encode()


def quick_fetch(url: str, headers: Mapping[str, str]) -> bytes:
    """The real fetcher, with retries cut short: a test that reaches a dead URL fails fast."""
    return http_fetch(url, headers, retry_for=1)


def parse(doc: object, fetch: Fetcher = quick_fetch) -> Plan:
    return parse_ignition(encode(doc), SOURCE, fetch=fetch)


def refusal(doc: object, fetch: Fetcher = quick_fetch) -> str:
    data = doc if isinstance(doc, bytes) else encode(doc)
    with pytest.raises(ProvisionError) as info:
        parse_ignition(data, SOURCE, fetch=fetch)
    return str(info.value)


def files(*entries: dict[str, Any], version: str = "3.4.0") -> dict[str, Any]:
    return config(version, storage={"files": list(entries)})


def data_url(data: bytes) -> str:
    return "data:;base64," + base64.b64encode(data).decode()


def sha512(data: bytes) -> str:
    return "sha512-" + hashlib.sha512(data).hexdigest()


def sha256(data: bytes) -> str:
    return "sha256-" + hashlib.sha256(data).hexdigest()


# --- A real HTTP server (tests/support/misbehaving_server.py) -----------------------------------


@pytest.fixture
def server(misbehaving: Callable[..., MisbehavingServer]) -> MisbehavingServer:
    return misbehaving()


# --- Versions and the document ------------------------------------------------------------------


@pytest.mark.parametrize("version", SPEC_VERSIONS)
def test_every_spec_3_version_is_read(version: str) -> None:
    plan = parse(config(version, passwd={"users": [{"name": "core"}]}))
    assert plan.format == "ignition"
    assert plan.source == f"{SOURCE} (Ignition {version})"
    assert plan.users == (User("core"),)


def test_the_five_versions() -> None:
    assert SPEC_VERSIONS == ("3.0.0", "3.1.0", "3.2.0", "3.3.0", "3.4.0")


@pytest.mark.parametrize("version", ["2.3.0", "2.0.0", "2.4.0-experimental", "1.0.0"])
def test_spec_2_says_how_to_translate(version: str) -> None:
    message = refusal(config(version))
    assert f"Ignition spec {version} is not supported" in message
    assert "butane" in message and "ign-converter" in message


def test_spec_1_is_recognised() -> None:
    message = refusal({"ignitionVersion": 1, "systemd": {}})
    assert "Ignition spec 1 is not supported" in message and "ign-converter" in message


@pytest.mark.parametrize("version", ["3.5.0", "3.4.0-experimental", "3", "4.0.0", ""])
def test_other_versions_are_refused(version: str) -> None:
    message = refusal(config(version))
    assert "ignition.version: expected one of 3.0.0, 3.1.0, 3.2.0, 3.3.0, 3.4.0" in message
    assert json.dumps(version) in message


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({}, "ignition.version: expected the spec version"),
        ({"ignition": {}}, "ignition.version: expected the spec version"),
        ({"ignition": "3.4.0"}, "ignition.version: expected the spec version"),
        ({"ignition": {"version": 3.4}}, "ignition.version: expected a string, got 3.4"),
        ([], "(top level): expected a JSON object (an Ignition config), got []"),
    ],
)
def test_the_version_is_required(doc: object, expected: str) -> None:
    assert expected in refusal(doc)


def test_invalid_json_names_line_and_column() -> None:
    message = refusal(b'{"ignition": {"version": "3.4.0"},\n  "storage": {"files": [}\n}')
    assert message.startswith(f"{SOURCE}: not valid JSON: ")
    assert "line 2, column 25" in message  # the "}" where a value belongs


def test_a_butane_config_gets_a_hint() -> None:
    message = refusal(b"variant: fcos\nversion: 1.5.0\n")
    assert "not valid JSON" in message and "compile it to Ignition with `butane`" in message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"ignition": {"version": "3.4.0", "version": "3.0.0"}}', 'has the key "version" twice'),
        (b'{"ignition": {"version": "3.4.0"}, "x": NaN}', "NaN is not JSON"),
        (b'{"ignition": {"version": "3.4.0\xff"}}', "not UTF-8 text (at byte 31)"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_other_json_faults(data: bytes, expected: str) -> None:
    assert expected in refusal(data)


def test_a_byte_order_mark_is_fine() -> None:
    assert parse_ignition(b"\xef\xbb\xbf" + encode(config()), SOURCE).files == ()


def test_what_butane_writes_for_nothing_passes() -> None:
    # Butane and Ignition's Go types serialise every section, empty, and null for unset pointers.
    doc = {
        "ignition": {
            "config": {"merge": [], "replace": {"source": None, "verification": {}}},
            "proxy": {"httpProxy": None, "noProxy": []},
            "security": {"tls": {"certificateAuthorities": []}},
            "timeouts": {"httpResponseHeaders": 10, "httpTotal": 0},
            "version": "3.4.0",
        },
        "kernelArguments": {"shouldExist": [], "shouldNotExist": None},
        "passwd": {
            "groups": [],
            "users": [
                {
                    "name": "core",
                    "uid": None,
                    "gecos": "",
                    "homeDir": None,
                    "noCreateHome": False,
                    "noUserGroup": False,
                    "noLogInit": None,
                    "primaryGroup": "",
                    "shell": None,
                    "system": False,
                    "shouldExist": True,
                }
            ],
        },
        "storage": {
            "disks": [],
            "raid": [],
            "filesystems": [],
            "luks": [],
            "files": [
                {
                    "path": "/etc/a",
                    "contents": {"source": "data:,a", "httpHeaders": [], "verification": {}},
                    "user": {},
                    "group": {"id": None, "name": None},
                }
            ],
            "directories": [
                {"path": "/var/d", "overwrite": False, "user": {"id": 0}, "group": {"name": "root"}}
            ],
            "links": [],
        },
        "systemd": {"units": []},
    }
    plan = parse(doc)
    assert plan.users == (User("core"),)
    assert plan.files == (File("/etc/a", b"a"),)
    assert plan.directories == (Directory("/var/d"),)


def test_an_empty_config_is_an_empty_plan() -> None:
    plan = parse(config())
    assert (plan.users, plan.files, plan.directories, plan.links, plan.units) == ((),) * 5
    assert plan.hostname is None and plan.notes == ()


# --- Users ------------------------------------------------------------------------------------


def test_users_with_keys_groups_and_password() -> None:
    hashed = "$y$j9T$abcdefghijklmnop$0123456789012345678901234567890123456789012"
    plan = parse(
        config(
            passwd={
                "users": [
                    {
                        "name": "core",
                        "sshAuthorizedKeys": [KEY, "ssh-rsa AAAAB3Nza second"],
                        "groups": ["sudo", "systemd-journal"],
                        "passwordHash": hashed,
                    },
                    {"name": "root", "sshAuthorizedKeys": [KEY]},
                    {"name": "_svc-1"},
                ]
            }
        )
    )
    assert plan.users == (
        User("core", (KEY, "ssh-rsa AAAAB3Nza second"), ("sudo", "systemd-journal"), hashed),
        User("root", (KEY,)),
        User("_svc-1"),
    )


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ({}, "passwd.users[0].name: expected a user name"),
        ({"name": "Core"}, "passwd.users[0].name: expected a user name: a lower-case"),
        ({"name": "1st"}, 'got "1st"'),
        ({"name": "a" * 33}, "passwd.users[0].name: expected a user name"),
        ({"name": "core", "sshAuthorizedKeys": [KEY + "\nssh-rsa evil"]}, "one public key"),
        ({"name": "core", "sshAuthorizedKeys": ["  "]}, "sshAuthorizedKeys[0]: expected one"),
        (
            {"name": "core", "sshAuthorizedKeys": [KEY, KEY]},
            "sshAuthorizedKeys[1]: expected a key not already given as sshAuthorizedKeys[0]",
        ),
        ({"name": "core", "groups": ["Wheel"]}, 'groups[0]: expected a group name, got "Wheel"'),
        ({"name": "core", "passwordHash": ""}, "passwordHash: expected a crypt(3) hash"),
        ({"name": "core", "passwordHash": "$6$x:0:0"}, "passwordHash: expected a crypt(3)"),
        ({"name": "core", "sshAuthorizedKeys": KEY}, "sshAuthorizedKeys: expected a list"),
        ({"name": "core", "groups": [None]}, "groups[0]: expected a string, not null"),
        ({"name": 7}, "passwd.users[0].name: expected a string, got 7"),
    ],
)
def test_bad_users(user: dict[str, Any], expected: str) -> None:
    assert expected in refusal(config(passwd={"users": [user]}))


def test_a_user_named_twice() -> None:
    message = refusal(config(passwd={"users": [{"name": "core"}, {"name": "core"}]}))
    assert (
        'passwd.users[1].name: expected a name not already used by passwd.users[0], got "core"'
        in (message)
    )


@pytest.mark.parametrize(
    ("field_name", "value"),
    [
        ("uid", 1000),
        ("uid", 0),
        ("gecos", "Core User"),
        ("homeDir", "/var/home/core"),
        ("noCreateHome", True),
        ("primaryGroup", "core"),
        ("noUserGroup", True),
        ("noLogInit", True),
        ("shell", "/bin/zsh"),
        ("system", True),
        ("shouldExist", False),
    ],
)
def test_user_fields_berth_does_not_implement(field_name: str, value: object) -> None:
    message = refusal(
        config(passwd={"users": [{"name": "a"}, {"name": "core", field_name: value}]})
    )
    assert f"passwd.users[1].{field_name}: not supported by Berth" in message


# --- Files --------------------------------------------------------------------------------------


def test_a_file_with_every_field() -> None:
    plan = parse(
        files(
            {
                "path": "/etc/app/config.toml",
                "mode": 384,
                "overwrite": True,
                "contents": {
                    "source": "data:,key%20%3D%201%0A",
                    "verification": {"hash": sha512(b"key = 1\n")},
                },
            }
        )
    )
    assert plan.files == (File("/etc/app/config.toml", b"key = 1\n", 0o600, overwrite=True),)


def test_file_defaults() -> None:
    (file,) = parse(files({"path": "/var/lib/x", "contents": {"source": "data:,x"}})).files
    assert file == File("/var/lib/x", b"x", 0o644, overwrite=False, append=False)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("data:,hello%20world%0A", b"hello world\n"),
        ("data:,plain text, with a comma", b"plain text, with a comma"),
        ("data:,caf%C3%A9 café", "café café".encode()),
        ("data:text/plain;charset=utf-8,a%2Fb", b"a/b"),
        ("data:;base64,aGVsbG8gd29ybGQK", b"hello world\n"),
        ("data:application/octet-stream;base64,AAH/", b"\x00\x01\xff"),
        ("DATA:;BASE64,aGk=", b"hi"),
        ("data:;base64,aGVs%0AbG8=", b"hello"),  # line breaks in base64 are skipped
        ("data:,", b""),
        ("", b""),  # Ignition: an empty source is an empty file
    ],
)
def test_data_urls(url: str, expected: bytes) -> None:
    (file,) = parse(files({"path": "/etc/f", "contents": {"source": url}})).files
    assert file.contents == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "data:;base64,aGVsbG8@",
            "storage.files[0].contents.source: expected a data: URL with valid base64",
        ),
        ("data:text/plain", "storage.files[0].contents.source: expected a data: URL (data:"),
        ("ftp://host/file", 'expected a data:, http: or https: URL, got "ftp://host/file"'),
        ("/etc/passwd", "expected a data:, http: or https: URL"),
        ("http:///path", "expected an http(s) URL with a host"),
        ("http://[::1/x", "storage.files[0].contents.source: expected a URL"),
        # Found by tests/test_fuzz_provision.py: unquote_to_bytes raised UnicodeEncodeError.
        ("data:,a\ud800b", "storage.files[0].contents.source: expected text that is valid Unicode"),
        (
            "data:;base64,\udfff",
            "storage.files[0].contents.source: expected text that is valid Unicode",
        ),
    ],
)
def test_bad_sources(url: str, expected: str) -> None:
    assert expected in refusal(files({"path": "/etc/f", "contents": {"source": url}}))


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (
            config(systemd={"units": [{"name": "a.service", "contents": "x\ud800"}]}),
            "units[0].contents",
        ),
        (files({"path": "/etc/a\udcff", "contents": {"source": "data:,x"}}), "files[0].path"),
        (
            config(passwd={"users": [{"name": "core", "sshAuthorizedKeys": [KEY + "\ud800"]}]}),
            "users[0].sshAuthorizedKeys[0]",
        ),
    ],
)
def test_a_lone_surrogate_anywhere_is_refused_naming_the_field(doc: object, field: str) -> None:
    # The parser took these, and writing the plan would have failed half-way.
    assert f"{field}: expected text that is valid Unicode" in refusal(doc)


def test_a_lone_surrogate_in_a_key_is_refused() -> None:
    message = refusal(config(storage={"files": [{"path\ud800": "/etc/a"}]}))
    assert "storage.files[0]: expected text that is valid Unicode" in message


@pytest.mark.parametrize(
    ("url", "version"),
    [
        ("s3://bucket/key", "3.0.0"),
        ("tftp://10.0.0.1/file", "3.4.0"),
        ("gs://bucket/object", "3.2.0"),
        ("arn:aws:s3:us-west-1:123456789012:accesspoint/test/object/some/path", "3.4.0"),
    ],
)
def test_schemes_berth_does_not_fetch_from(url: str, version: str) -> None:
    message = refusal(files({"path": "/etc/f", "contents": {"source": url}}, version=version))
    scheme = url.split(":")[0]
    assert f"storage.files[0].contents.source: not supported by Berth ({scheme}: URLs" in message


def test_a_scheme_too_new_for_the_version_is_not_a_url() -> None:
    message = refusal(
        files({"path": "/etc/f", "contents": {"source": "gs://b/o"}}, version="3.1.0")
    )
    assert "expected a data:, http: or https: URL" in message


def test_gzip_contents_are_decompressed_and_the_hash_is_of_the_result() -> None:
    text = b"compressed text\n" * 100
    plan = parse(
        files(
            {
                "path": "/etc/z",
                "contents": {
                    "source": data_url(gzip.compress(text)),
                    "compression": "gzip",
                    "verification": {"hash": sha256(text)},
                },
            }
        )
    )
    assert plan.files[0].contents == text


@pytest.mark.parametrize("compression", ["", None])
def test_no_compression(compression: str | None) -> None:
    entry = {"path": "/etc/z", "contents": {"source": "data:,x", "compression": compression}}
    assert parse(files(entry)).files[0].contents == b"x"


def test_gzip_that_is_not_gzip() -> None:
    entry = {"path": "/etc/z", "contents": {"source": "data:,plain", "compression": "gzip"}}
    assert "storage.files[0].contents.compression: expected gzip data" in refusal(files(entry))


def test_unknown_compression() -> None:
    entry = {"path": "/etc/z", "contents": {"source": "data:,x", "compression": "xz"}}
    message = refusal(files(entry))
    assert 'storage.files[0].contents.compression: expected "gzip" or nothing, got "xz"' in message


def test_hash_mismatch_names_the_field_and_both_hashes() -> None:
    wrong = sha512(b"something else")
    entry = {
        "path": "/etc/h",
        "contents": {"source": "data:,actual", "verification": {"hash": wrong}},
    }
    message = refusal(files(entry))
    assert "storage.files[0].contents.verification.hash" in message
    assert sha512(b"actual") in message and wrong in message


@pytest.mark.parametrize(
    ("value", "version", "expected"),
    [
        (
            "md5-d41d8cd98f00b204e9800998ecf8427e",
            "3.4.0",
            'expected "sha256-<hex>" or "sha512-<hex>"',
        ),
        ("sha512-abc", "3.4.0", "verification.hash: expected"),
        ("sha256-" + "g" * 64, "3.4.0", "verification.hash: expected"),
        ("sha256-" + "0" * 128, "3.4.0", "verification.hash: expected"),
        (sha256(b"x"), "3.0.0", '"sha512-<hex>" (sha256 is new in spec 3.1.0)'),
    ],
)
def test_bad_hashes(value: str, version: str, expected: str) -> None:
    entry = {"path": "/etc/h", "contents": {"source": "data:,x", "verification": {"hash": value}}}
    assert expected in refusal(files(entry, version=version))


def test_sha512_in_3_0_and_upper_case_hex() -> None:
    entry = {
        "path": "/etc/h",
        "contents": {
            "source": "data:,x",
            "verification": {"hash": "sha512-" + hashlib.sha512(b"x").hexdigest().upper()},
        },
    }
    assert parse(files(entry, version="3.0.0")).files[0].contents == b"x"


def test_no_source_makes_sure_the_file_exists() -> None:
    (file,) = parse(files({"path": "/etc/empty", "mode": 416})).files
    assert file == File("/etc/empty", b"", 0o640, overwrite=False, append=True)


def test_overwrite_needs_a_source() -> None:
    message = refusal(files({"path": "/etc/x", "overwrite": True}))
    assert "storage.files[0].contents.source: expected a source when overwrite is true" in message


def test_overwrite_with_an_empty_source_empties_the_file() -> None:
    (file,) = parse(files({"path": "/etc/x", "overwrite": True, "contents": {"source": ""}})).files
    assert file == File("/etc/x", b"", overwrite=True)


@pytest.mark.parametrize(
    "contents",
    [
        {"compression": "gzip"},
        {"verification": {"hash": sha512(b"")}},
        {"httpHeaders": [{"name": "A", "value": "b"}]},
    ],
)
def test_resource_fields_without_a_source(contents: dict[str, Any]) -> None:
    message = refusal(files({"path": "/etc/x", "contents": contents}))
    assert "storage.files[0].contents.source: expected a source for the compression" in message


def test_append_is_folded_after_the_contents() -> None:
    entry = {
        "path": "/etc/motd",
        "overwrite": True,
        "contents": {"source": "data:,one%0A"},
        "append": [
            {"source": "data:,two%0A"},
            {"source": data_url(gzip.compress(b"three\n")), "compression": "gzip"},
        ],
    }
    assert parse(files(entry)).files == (File("/etc/motd", b"one\ntwo\nthree\n", overwrite=True),)


def test_append_without_contents_appends_to_what_is_there() -> None:
    entry = {"path": "/etc/motd", "append": [{"source": "data:,two%0A"}, {"source": "data:,3"}]}
    assert parse(files(entry)).files == (File("/etc/motd", b"two\n3", append=True),)


def test_append_entries_are_checked() -> None:
    entry = {"path": "/etc/motd", "append": [{"source": "data:,a"}, {"compression": "gzip"}]}
    assert "storage.files[0].append[1].source: expected a URL to append" in refusal(files(entry))
    entry = {
        "path": "/etc/motd",
        "append": [{"source": "data:,a", "verification": {"hash": sha512(b"b")}}],
    }
    assert "storage.files[0].append[0].verification.hash: the contents" in refusal(files(entry))


def test_etc_hostname_becomes_the_hostname() -> None:
    plan = parse(
        files({"path": "/etc/hostname", "mode": 420, "contents": {"source": "data:,node-7%0A"}})
    )
    assert plan.hostname == "node-7"
    assert plan.files == ()
    assert any("node-7" in note for note in plan.notes)


def test_an_etc_hostname_that_is_not_a_hostname_stays_a_file() -> None:
    plan = parse(files({"path": "/etc/hostname", "contents": {"source": "data:,node.example.com"}}))
    assert plan.hostname is None
    assert plan.files == (File("/etc/hostname", b"node.example.com"),)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (
            "0644",
            'storage.files[0].mode: expected an integer (decimal, e.g. 420 for 0644), got "0644"',
        ),
        (
            420.0,
            "storage.files[0].mode: expected an integer (decimal, e.g. 420 for 0644), got 420.0",
        ),
        (True, "storage.files[0].mode: expected an integer (decimal, e.g. 420 for 0644), got true"),
        (4096, "storage.files[0].mode: expected a permission mode between 0 and 4095"),
        (-1, "storage.files[0].mode: expected a permission mode between 0 and 4095"),
        (
            0o4755,
            (
                "storage.files[0].mode: not supported by Berth (setuid, setgid and sticky bits "
                "(mode 2541 is 04755)"
            ),
        ),
        (0o1777, "not supported by Berth (setuid, setgid and sticky bits"),
    ],
)
def test_bad_modes(mode: object, expected: str) -> None:
    assert expected in refusal(files({"path": "/etc/x", "mode": mode, "contents": {"source": ""}}))


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/usr/bin/tool", "storage.files[0].path: expected a path under /etc, /var, /home, /root"),
        ("/run/x", "expected a path under /etc, /var, /home, /root"),
        ("/etcetera/x", "expected a path under /etc, /var, /home, /root"),
        ("etc/x", "storage.files[0].path: expected an absolute path"),
        ("/etc/../usr/bin/x", "expected a normalised absolute path"),
        ("/etc/./x", "expected a normalised absolute path"),
        ("/etc//x", "expected a normalised absolute path"),
        ("/etc/x/", "expected a normalised absolute path"),
        (None, "storage.files[0].path: expected an absolute path"),
        (5, "storage.files[0].path: expected a string, got 5"),
    ],
)
def test_bad_paths(path: object, expected: str) -> None:
    entry: dict[str, Any] = {"contents": {"source": ""}}
    if path is not None:
        entry["path"] = path
    assert expected in refusal(files(entry))


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            {"path": "/etc/x", "overwrite": "yes"},
            'storage.files[0].overwrite: expected a boolean, got "yes"',
        ),
        (
            {"path": "/etc/x", "contents": "data:,x"},
            "storage.files[0].contents: expected an object",
        ),
        (
            {"path": "/etc/x", "append": {"source": "data:,x"}},
            "storage.files[0].append: expected a list",
        ),
        (
            {"path": "/etc/x", "contents": {"source": 5}},
            "storage.files[0].contents.source: expected a string, got 5",
        ),
        (
            {"path": "/etc/x", "contents": {"verification": {"hash": 1}}},
            "verification.hash: expected a string",
        ),
    ],
)
def test_file_field_types(entry: dict[str, Any], expected: str) -> None:
    assert expected in refusal(files(entry))


@pytest.mark.parametrize(
    ("owner", "value", "path"),
    [
        ("user", {"id": 1000}, "storage.files[0].user.id"),
        ("user", {"name": "core"}, "storage.files[0].user.name"),
        ("group", {"id": 5}, "storage.files[0].group.id"),
        ("group", {"name": "wheel"}, "storage.files[0].group.name"),
    ],
)
def test_file_owners_other_than_root(owner: str, value: dict[str, Any], path: str) -> None:
    message = refusal(files({"path": "/etc/x", owner: value}))
    assert (
        f"{path}: not supported by Berth (everything provisioning writes belongs to root)"
        in message
    )


def test_headers_only_for_http() -> None:
    entry = {
        "path": "/etc/x",
        "contents": {"source": "data:,x", "httpHeaders": [{"name": "A", "value": "b"}]},
    }
    message = refusal(files(entry))
    assert (
        "storage.files[0].contents.httpHeaders: expected no headers unless the source is an "
        "http(s) URL"
    ) in message


# --- Directories and links -------------------------------------------------------------------


def test_directories() -> None:
    doc = config(
        storage={
            "directories": [{"path": "/var/lib/app"}, {"path": "/home/core/.config", "mode": 448}]
        }
    )
    assert parse(doc).directories == (
        Directory("/var/lib/app", 0o755),
        Directory("/home/core/.config", 0o700),
    )


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"path": "/opt/x"}, "storage.directories[0].path: expected a path under"),
        (
            {"path": "/var/x", "mode": "0755"},
            (
                "storage.directories[0].mode: expected an integer (decimal, e.g. 493 for 0755), "
                'got "0755"'
            ),
        ),
        (
            {"path": "/var/x", "overwrite": True},
            "storage.directories[0].overwrite: not supported by Berth",
        ),
        (
            {"path": "/var/x", "user": {"name": "core"}},
            "storage.directories[0].user.name: not supported by Berth",
        ),
        ({"path": "/var/x", "mode": 0o1777}, "storage.directories[0].mode: not supported by Berth"),
        (
            {"path": "/var/x", "contents": {}},
            (
                "storage.directories[0]: expected only the keys group, mode, overwrite, path, "
                'user, got "contents"'
            ),
        ),
    ],
)
def test_bad_directories(entry: dict[str, Any], expected: str) -> None:
    assert expected in refusal(config(storage={"directories": [entry]}))


def test_links() -> None:
    doc = config(
        storage={
            "links": [
                {
                    "path": "/etc/localtime",
                    "target": "../usr/share/zoneinfo/Europe/Paris",
                    "overwrite": True,
                },
                {"path": "/etc/alias", "target": "/etc/original", "hard": True},
                {"path": "/var/l", "target": "/usr/lib/os-release", "hard": False},
            ]
        }
    )
    assert parse(doc).links == (
        Link("/etc/localtime", "../usr/share/zoneinfo/Europe/Paris", hard=False, overwrite=True),
        Link("/etc/alias", "/etc/original", hard=True, overwrite=False),
        Link("/var/l", "/usr/lib/os-release"),
    )


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"path": "/etc/l"}, "storage.links[0].target: expected the path the link points to"),
        (
            {"path": "/etc/l", "target": ""},
            'storage.links[0].target: expected the path the link points to, got ""',
        ),
        (
            {"path": "/etc/l", "target": "/usr/bin/x", "hard": True},
            "storage.links[0].target: expected a path under",
        ),
        (
            {"path": "/etc/l", "target": "x", "hard": "true"},
            'storage.links[0].hard: expected a boolean, got "true"',
        ),
        ({"path": "/usr/l", "target": "x"}, "storage.links[0].path: expected a path under"),
        (
            {"path": "/etc/l", "target": "x", "group": {"id": 10}},
            "storage.links[0].group.id: not supported by Berth",
        ),
    ],
)
def test_bad_links(entry: dict[str, Any], expected: str) -> None:
    assert expected in refusal(config(storage={"links": [entry]}))


@pytest.mark.parametrize(
    ("storage", "expected"),
    [
        (
            {"files": [{"path": "/etc/a"}, {"path": "/etc/b"}, {"path": "/etc/a"}]},
            (
                "storage.files[2].path: expected a path not already used by storage.files[0], got "
                '"/etc/a"'
            ),
        ),
        (
            {"files": [{"path": "/etc/a"}], "directories": [{"path": "/etc/a"}]},
            "storage.directories[0].path: expected a path not already used by storage.files[0]",
        ),
        (
            {"directories": [{"path": "/var/d"}], "links": [{"path": "/var/d", "target": "x"}]},
            "storage.links[0].path: expected a path not already used by storage.directories[0]",
        ),
    ],
)
def test_duplicate_paths_name_both_entries(storage: dict[str, Any], expected: str) -> None:
    assert expected in refusal(config(storage=storage))


# --- Units ------------------------------------------------------------------------------------

QUADLET = (
    "[Container]\nImage=localhost/web:1\nPublishPort=80:80\n\n"
    "[Install]\nWantedBy=multi-user.target\n"
)


def test_units_with_every_field() -> None:
    doc = config(
        systemd={
            "units": [
                {"name": "web.container", "contents": QUADLET},
                {
                    "name": "backup.service",
                    "enabled": True,
                    "contents": "[Service]\nExecStart=/usr/bin/true\n",
                    "dropins": [
                        {"name": "10-env.conf", "contents": "[Service]\nEnvironment=A=1\n"},
                        {"name": "20-empty.conf"},
                    ],
                },
                {"name": "debug-shell.service", "enabled": False},
                {"name": "getty@tty1.service", "mask": True},
                {
                    "name": "sshd.service",
                    "dropins": [{"name": "port.conf", "contents": "[Service]\n"}],
                },
                {"name": "fstrim.timer", "enabled": None, "mask": False},
            ]
        }
    )
    assert parse(doc).units == (
        Unit("web.container", contents=QUADLET),
        Unit(
            "backup.service",
            contents="[Service]\nExecStart=/usr/bin/true\n",
            enabled=True,
            dropins=(
                Dropin("10-env.conf", "[Service]\nEnvironment=A=1\n"),
                Dropin("20-empty.conf", ""),
            ),
        ),
        Unit("debug-shell.service", enabled=False),
        Unit("getty@tty1.service", mask=True),
        Unit("sshd.service", dropins=(Dropin("port.conf", "[Service]\n"),)),
        Unit("fstrim.timer"),
    )


@pytest.mark.parametrize(
    ("unit", "expected"),
    [
        ({}, "systemd.units[0].name: expected a unit name"),
        (
            {"name": "web"},
            (
                "systemd.units[0].name: expected a unit name with a systemd type (.service, "
                '.timer, ...) or a quadlet type (.container, .volume, ...), got "web"'
            ),
        ),
        ({"name": "../x.service"}, "systemd.units[0].name: expected a unit name"),
        (
            {"name": "a.service", "enabled": "yes"},
            'systemd.units[0].enabled: expected a boolean, got "yes"',
        ),
        ({"name": "a.service", "mask": 1}, "systemd.units[0].mask: expected a boolean, got 1"),
        ({"name": "a.service", "contents": ["x"]}, "systemd.units[0].contents: expected a string"),
        (
            {"name": "a.service", "contents": "a\u0000b"},
            "systemd.units[0].contents: expected text without NUL",
        ),
        (
            {"name": "a.service", "dropins": [{"name": "x.service"}]},
            (
                'systemd.units[0].dropins[0].name: expected a file name ending in ".conf", got '
                '"x.service"'
            ),
        ),
        (
            {"name": "a.service", "dropins": [{"name": "../x.conf"}]},
            "systemd.units[0].dropins[0].name: expected a file name",
        ),
        (
            {"name": "a.service", "dropins": [{"contents": "x"}]},
            "systemd.units[0].dropins[0].name: expected a file name",
        ),
        (
            {"name": "a.service", "dropins": [{"name": "a.conf"}, {"name": "a.conf"}]},
            "systemd.units[0].dropins[1].name: expected a name no other drop-in of this unit has",
        ),
        (
            {"name": "a.service", "enable": True},
            (
                "systemd.units[0]: expected only the keys contents, dropins, enabled, mask, name, "
                'got "enable"'
            ),
        ),
    ],
)
def test_bad_units(unit: dict[str, Any], expected: str) -> None:
    assert expected in refusal(config(systemd={"units": [unit]}))


def test_a_unit_named_twice() -> None:
    units = [{"name": "a.service"}, {"name": "b.service"}, {"name": "a.service", "enabled": True}]
    message = refusal(config(systemd={"units": units}))
    assert (
        "systemd.units[2].name: expected a name not already used by systemd.units[0], got "
        '"a.service"'
    ) in message


# --- What Berth refuses, by name ------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        (
            {
                "ignition": {
                    "version": "3.4.0",
                    "config": {"merge": [{"source": "https://example.com/a.ign"}]},
                }
            },
            "ignition.config.merge",
        ),
        (
            {
                "ignition": {
                    "version": "3.4.0",
                    "config": {"replace": {"source": "https://example.com/a.ign"}},
                }
            },
            "ignition.config.replace",
        ),
        (
            {"ignition": {"version": "3.4.0", "timeouts": {"httpTotal": 30}}},
            "ignition.timeouts.httpTotal",
        ),
        (
            {"ignition": {"version": "3.4.0", "timeouts": {"httpResponseHeaders": 5}}},
            "ignition.timeouts.httpResponseHeaders",
        ),
        (
            {
                "ignition": {
                    "version": "3.4.0",
                    "security": {"tls": {"certificateAuthorities": [{"source": "data:,x"}]}},
                }
            },
            "ignition.security.tls.certificateAuthorities",
        ),
        (
            {"ignition": {"version": "3.1.0", "proxy": {"httpProxy": "http://proxy:3128"}}},
            "ignition.proxy.httpProxy",
        ),
        (
            {"ignition": {"version": "3.4.0", "proxy": {"httpsProxy": "http://proxy:3128"}}},
            "ignition.proxy.httpsProxy",
        ),
        (
            {"ignition": {"version": "3.4.0", "proxy": {"noProxy": ["example.com"]}}},
            "ignition.proxy.noProxy",
        ),
        (config(storage={"disks": [{"device": "/dev/vdb", "wipeTable": True}]}), "storage.disks"),
        (
            config(
                storage={
                    "raid": [{"name": "md0", "level": "raid1", "devices": ["/dev/a", "/dev/b"]}]
                }
            ),
            "storage.raid",
        ),
        (
            config(
                storage={
                    "filesystems": [{"device": "/dev/vdb1", "format": "ext4", "path": "/var/data"}]
                }
            ),
            "storage.filesystems",
        ),
        (
            config("3.2.0", storage={"luks": [{"name": "data", "device": "/dev/vdb"}]}),
            "storage.luks",
        ),
        (config(passwd={"groups": [{"name": "ops"}]}), "passwd.groups"),
        (config("3.3.0", kernelArguments={"shouldExist": ["quiet"]}), "kernelArguments"),
        (config(kernelArguments={"shouldNotExist": ["quiet"]}), "kernelArguments"),
    ],
)
def test_unsupported_fields_are_refused_by_name(doc: dict[str, Any], path: str) -> None:
    assert f"{path}: not supported by Berth (" in refusal(doc)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            config(storage={"files": []}, systemd={}, extra=1),
            (
                "(top level): expected only the keys ignition, kernelArguments, passwd, storage, "
                'systemd, got "extra"'
            ),
        ),
        (
            config("3.2.0", networkd={}),
            (
                "(top level): expected only the keys ignition, passwd, storage, systemd, got "
                '"networkd"'
            ),
        ),
        (
            {"ignition": {"version": "3.4.0", "verison": "3.4.0"}},
            (
                "ignition: expected only the keys config, proxy, security, timeouts, version, got "
                '"verison"'
            ),
        ),
        (
            {"ignition": {"version": "3.0.0", "timeouts": {"http": 1}}},
            'ignition.timeouts: expected only the keys httpResponseHeaders, httpTotal, got "http"',
        ),
        (
            config(storage={"file": []}),
            (
                "storage: expected only the keys directories, disks, files, filesystems, links, "
                'luks, raid, got "file"'
            ),
        ),
        (
            files({"path": "/etc/x", "contents": {"sauce": "data:,"}}),
            (
                "storage.files[0].contents: expected only the keys compression, httpHeaders, "
                'source, verification, got "sauce"'
            ),
        ),
        (
            config("3.0.0", passwd={"users": [{"name": "a", "sshKeys": []}]}),
            "passwd.users[0]: expected only the keys",
        ),
        (config(passwd={"users": [{"name": "a", "create": {}}]}), '"create"'),
    ],
)
def test_unknown_fields_list_the_allowed_keys(doc: dict[str, Any], expected: str) -> None:
    assert expected in refusal(doc)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            config("3.2.0", kernelArguments={}),
            (
                "kernelArguments: expected a config of spec 3.3.0 or later (the field is new in "
                "3.3.0; this config declares 3.2.0)"
            ),
        ),
        (
            config("3.1.0", storage={"luks": []}),
            "storage.luks: expected a config of spec 3.2.0 or later",
        ),
        (
            config("3.1.0", passwd={"users": [{"name": "a", "shouldExist": True}]}),
            "passwd.users[0].shouldExist: expected a config of spec 3.2.0 or later",
        ),
        (
            {"ignition": {"version": "3.0.0", "proxy": {}}},
            "ignition.proxy: expected a config of spec 3.1.0 or later",
        ),
        (
            {"ignition": {"version": "3.0.0", "config": {"replace": {"compression": None}}}},
            "ignition.config.replace.compression: expected a config of spec 3.1.0 or later",
        ),
        (
            files(
                {
                    "path": "/etc/x",
                    "contents": {"source": "https://example.com/x", "httpHeaders": []},
                },
                version="3.0.0",
            ),
            "storage.files[0].contents.httpHeaders: expected a config of spec 3.1.0 or later",
        ),
    ],
)
def test_fields_newer_than_the_declared_version(doc: dict[str, Any], expected: str) -> None:
    assert expected in refusal(doc)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (config(storage=[]), "storage: expected an object, got []"),
        (config(storage={"files": {}}), "storage.files: expected a list, got {}"),
        (
            config(storage={"files": ["/etc/x"]}),
            'storage.files[0]: expected an object, got "/etc/x"',
        ),
        (config(storage={"files": [None]}), "storage.files[0]: expected an object, not null"),
        (config(passwd={"users": "core"}), 'passwd.users: expected a list, got "core"'),
        (
            config(systemd={"units": [{"name": "a.service", "dropins": {}}]}),
            "systemd.units[0].dropins: expected a list",
        ),
        (
            {"ignition": {"version": "3.4.0", "timeouts": {"httpTotal": "30"}}},
            "ignition.timeouts.httpTotal: not supported by Berth",
        ),
        (
            {"ignition": {"version": "3.4.0", "timeouts": []}},
            "ignition.timeouts: expected an object, got []",
        ),
        (
            config(kernelArguments={"shouldExist": "quiet"}),
            "kernelArguments: not supported by Berth",
        ),
    ],
)
def test_types_are_checked_everywhere(doc: dict[str, Any], expected: str) -> None:
    assert expected in refusal(doc)


# --- Fetching over HTTP ---------------------------------------------------------------------


def test_http_contents_are_fetched_and_verified(server: MisbehavingServer) -> None:
    body = b"fetched contents\n"
    server.files["/files/a"] = body
    entry = {
        "path": "/etc/a",
        "contents": {"source": server.url + "/files/a", "verification": {"hash": sha512(body)}},
    }
    plan = parse(files(entry))
    assert plan.files == (File("/etc/a", body),)
    assert plan.notes == ()  # verified: nothing to warn about
    assert [s.path for s in server.seen] == ["/files/a"]


def test_http_hash_mismatch_names_the_field_and_both_hashes(server: MisbehavingServer) -> None:
    server.files["/a"] = b"tampered"
    expected = sha256(b"original")
    entry = {
        "path": "/etc/a",
        "contents": {"source": server.url + "/a", "verification": {"hash": expected}},
    }
    message = refusal(files(entry))
    assert "storage.files[0].contents.verification.hash" in message
    assert expected in message and sha256(b"tampered") in message
    assert server.url + "/a" in message


def test_http_headers_are_sent_and_values_not_shown(server: MisbehavingServer) -> None:
    server.files["/secret"] = b"s"
    headers = [
        {"name": "Authorization", "value": "Bearer t0ken"},
        {"name": "X-Empty", "value": ""},
        {"name": "X-Removed", "value": None},
    ]
    entry = {
        "path": "/etc/s",
        "contents": {"source": server.url + "/secret?sig=abc", "httpHeaders": headers},
    }
    plan = parse(files(entry, version="3.1.0"))
    seen = server.seen[0].headers
    assert seen["Authorization"] == "Bearer t0ken" and seen["X-Empty"] == ""
    assert "X-Removed" not in seen
    # Plain http without a hash is worth a note; the query (often a token) is not shown.
    (note,) = plan.notes
    assert "storage.files[0].contents.source: fetched" in note and "over plain http" in note
    assert "sig=abc" not in note


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (
            [{"name": "Bad Name", "value": "x"}],
            'httpHeaders[0].name: expected an HTTP header name, got "Bad Name"',
        ),
        ([{"value": "x"}], "httpHeaders[0].name: expected an HTTP header name, got null"),
        (
            [{"name": "A", "value": "1"}, {"name": "a", "value": "2"}],
            'httpHeaders[1].name: expected a header not already given, got "a"',
        ),
        (
            [{"name": "A", "value": "x\r\nInjected: 1"}],
            "httpHeaders[0].value: expected a header value on one line",
        ),
    ],
)
def test_bad_http_headers(
    server: MisbehavingServer, headers: list[dict[str, Any]], expected: str
) -> None:
    entry = {"path": "/etc/s", "contents": {"source": server.url + "/x", "httpHeaders": headers}}
    message = refusal(files(entry))
    assert expected in message
    assert "Injected" not in message
    assert server.seen == []  # refused before fetching


def test_gzip_over_http(server: MisbehavingServer) -> None:
    text = b"big text " * 1000
    server.files["/z.gz"] = gzip.compress(text)
    entry = {
        "path": "/var/z",
        "contents": {
            "source": server.url + "/z.gz",
            "compression": "gzip",
            "verification": {"hash": sha512(text)},
        },
        "append": [{"source": server.url + "/z.gz", "compression": "gzip"}],
    }
    assert parse(files(entry)).files[0].contents == text + text


def test_http_error_names_the_field_and_the_url(server: MisbehavingServer) -> None:
    message = refusal(files({"path": "/etc/a", "contents": {"source": server.url + "/missing"}}))
    assert f"storage.files[0].contents.source: fetching {server.url}/missing: HTTP 404" in message


@pytest.mark.parametrize(
    ("section", "fault", "expected"),
    [
        ("passwd", {"users": [{"name": "a", "uid": 1000}]}, "passwd.users[0].uid: not supported"),
        ("passwd", {"users": [{"name": "A"}]}, "passwd.users[0].name: expected a user name"),
        ("systemd", {"units": [{"name": "web"}]}, "systemd.units[0].name: expected a unit name"),
        ("storage", {"links": [{"path": "/etc/a", "target": "x"}]}, "storage.links[0].path"),
        ("storage", {"files": [{"path": "/etc/b", "mode": 0o4755}]}, "storage.files[1].mode"),
    ],
)
def test_nothing_is_fetched_from_a_config_that_is_refused(
    server: MisbehavingServer, section: str, fault: dict[str, Any], expected: str
) -> None:
    server.files["/a"] = b"a"
    doc = files({"path": "/etc/a", "contents": {"source": server.url + "/a"}})
    if section == "storage":
        for key, entries in fault.items():
            doc["storage"].setdefault(key, []).extend(entries)
    else:
        doc[section] = fault
    assert expected in refusal(doc)
    assert server.seen == []


def test_a_server_error_is_retried(server: MisbehavingServer) -> None:
    server.files["/flaky"] = b"ok"
    server.fail("/flaky", 503, 502)
    assert http_fetch(server.url + "/flaky", {}, retry_for=10) == b"ok"
    assert len(server.seen) == 3


def test_a_client_error_is_not_retried(server: MisbehavingServer) -> None:
    server.files["/gone"] = b""
    server.fail("/gone", 410)
    with pytest.raises(ProvisionError, match="HTTP 410"):
        http_fetch(server.url + "/gone", {}, retry_for=10)
    assert len(server.seen) == 1


def test_a_network_that_comes_up_late() -> None:
    port = free_port()
    started: list[MisbehavingServer] = []
    ready = threading.Event()

    def start_later() -> None:
        time.sleep(0.4)
        late = MisbehavingServer(port=port)
        late.files["/late"] = b"finally"
        started.append(late.start())
        ready.set()

    threading.Thread(target=start_later, daemon=True).start()
    try:
        assert http_fetch(f"http://127.0.0.1:{port}/late", {}, retry_for=10) == b"finally"
    finally:
        if ready.wait(5):
            started[0].stop()


def test_a_network_that_never_comes_up() -> None:
    with refusing_port() as port:
        url = f"http://127.0.0.1:{port}/x"
        secret = "?token=t0ken"
        started = time.monotonic()
        with pytest.raises(ProvisionError) as info:
            http_fetch(url + secret, {}, retry_for=0.3)
    assert time.monotonic() - started < 3
    message = str(info.value)
    assert message.startswith(f"fetching {url}?...: Failed to establish a new connection")
    assert "Connection refused" in message and "t0ken" not in message
    assert "gave up after" in message and "in 0.3 s" in message


def test_a_stalled_server_times_out(server: MisbehavingServer) -> None:
    server.files["/slow"] = b"late"
    server.rules.append(Misbehaviour("/slow", wait=1.0))
    with pytest.raises(ProvisionError, match=r"/slow: Read timed out\. \(read timeout=0\.2\)"):
        http_fetch(server.url + "/slow", {}, timeout=0.2, retry_for=0)


def test_a_tls_failure_is_not_retried(server: MisbehavingServer) -> None:
    # Waiting does not fix a certificate: an https URL answered in plain HTTP fails at once.
    server.files["/a"] = b"a"
    url = (server.url + "/a").replace("http://", "https://")
    started = time.monotonic()
    with pytest.raises(ProvisionError) as info:
        http_fetch(url, {}, retry_for=10)
    assert time.monotonic() - started < 5
    assert str(info.value).startswith(f"fetching {url}: TLS failed: ")


def test_a_failure_reason_never_repeats_the_url() -> None:
    # urllib3 names the URL, query and token included, when it has no inner reason to give.
    error = requests.exceptions.RetryError(
        "HTTPSConnectionPool(host='h', port=443): Max retries exceeded with url: "
        "/c.ign?token=t0ken (Caused by ResponseError('too many 500 error responses'))"
    )
    assert failure_reason(error) == (
        "Max retries exceeded for this URL "
        "(Caused by ResponseError('too many 500 error responses'))"
    )


def test_a_body_over_the_cap_is_refused(server: MisbehavingServer) -> None:
    server.files["/big"] = b"x" * 1000
    with pytest.raises(ProvisionError, match="1000 bytes, more than 100"):
        http_fetch(server.url + "/big", {}, max_bytes=100)


def test_parse_uses_the_fetcher_it_is_given(server: MisbehavingServer) -> None:
    server.files["/a"] = b"a"
    asked: list[tuple[str, dict[str, str]]] = []

    def fetch(url: str, headers: Mapping[str, str]) -> bytes:
        asked.append((url, dict(headers)))
        return http_fetch(url, headers, retry_for=1)

    entry = {
        "path": "/etc/a",
        "contents": {"source": server.url + "/a", "httpHeaders": [{"name": "X", "value": "1"}]},
    }
    assert parse(files(entry), fetch=fetch).files[0].contents == b"a"
    assert asked == [(server.url + "/a", {"X": "1"})]


def test_a_fetcher_error_is_prefixed_with_the_field() -> None:
    def fetch(url: str, headers: Mapping[str, str]) -> bytes:
        raise ProvisionError(f"fetching {url}: no route to host")

    entry = {"path": "/etc/a", "append": [{"source": "https://example.com/a"}]}
    message = refusal(files(entry), fetch=fetch)
    assert message == (
        f"{SOURCE} (Ignition 3.4.0): storage.files[0].append[0].source: fetching "
        "https://example.com/a: no route to host"
    )


def test_credentials_in_a_url_are_not_shown(server: MisbehavingServer) -> None:
    server.files["/a"] = b"x"
    url = (server.url + "/a?token=t0ken").replace("http://", "http://user:pa55@")
    entry = {"path": "/etc/a", "contents": {"source": url, "verification": {"hash": sha512(b"y")}}}
    message = refusal(files(entry))
    assert server.seen[0].headers["Authorization"].startswith("Basic ")
    assert "pa55" not in message and "t0ken" not in message
    assert server.url + "/a?..." in message


def test_the_documented_example() -> None:
    """The example in docs/provisioning.md: a user with a key, a web page, a quadlet file."""
    page = "<h1>Hello from Berth</h1>\n"
    quadlet = (
        "[Container]\nImage=localhost/web:1\nPublishPort=80:80\n"
        "Volume=/var/srv/web:/usr/share/nginx/html:ro,Z\n\n[Install]\nWantedBy=multi-user.target\n"
    )
    doc = config(
        passwd={"users": [{"name": "core", "sshAuthorizedKeys": [KEY]}]},
        storage={
            "files": [
                {
                    "path": "/var/srv/web/index.html",
                    "mode": 420,
                    "contents": {"source": "data:," + urllib.parse.quote(page)},
                },
                {
                    "path": "/etc/containers/systemd/web.container",
                    "mode": 420,
                    "contents": {"source": "data:," + urllib.parse.quote(quadlet, safe="")},
                },
            ]
        },
    )
    plan = parse(doc)
    assert plan.users == (User("core", (KEY,)),)
    assert plan.files == (
        File("/var/srv/web/index.html", page.encode()),
        File("/etc/containers/systemd/web.container", quadlet.encode()),
    )
