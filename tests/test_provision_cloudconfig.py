"""updater.provision.cloudconfig: user-data kinds, the cloud-config subset, and every refusal."""

from __future__ import annotations

import base64
import gzip
import textwrap

import pytest

from updater.provision.cloudconfig import UserDataKind, classify, decompress, parse_user_data
from updater.provision.plan import Command, File, Plan, ProvisionError, User

SOURCE = "test user-data"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBerthTestKey op@laptop"
KEY2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtherTestKey2 ci@runner"
HASH = "$y$j9T$abcdefghijklmnop$0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcd./"


def cloud_config(body: str) -> bytes:
    return ("#cloud-config\n" + textwrap.dedent(body)).encode()


def parse(body: str) -> Plan:
    plan = parse_user_data(cloud_config(body), SOURCE)
    assert plan is not None
    assert (plan.format, plan.source) == ("cloud-config", SOURCE)
    return plan


def refused(body: str) -> str:
    with pytest.raises(ProvisionError) as error:
        parse_user_data(cloud_config(body), SOURCE)
    message = str(error.value)
    assert message.startswith(f"{SOURCE}: ")
    return message


# ---- kinds of user-data -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", "empty"),
        (b" \n\t\r\n", "empty"),
        (b'{"ignition": {"version": "3.4.0"}}', "ignition"),
        (b'\n  {"ignition": {}}', "ignition"),
        (b"#cloud-config\nhostname: a\n", "cloud-config"),
        (b"#cloud-config", "cloud-config"),
        (b"#cloud-config  \r\nhostname: a\r\n", "cloud-config"),
        (b"\n#Cloud-Config\n", "cloud-config"),  # cloud-init compares in lower case
        (b"#!/bin/sh\necho hi\n", "script"),
        (b"#include\nhttps://config.example/a.yaml\n", "include"),
        (b"#include-once\nhttps://config.example/a.yaml\n", "include"),
        (b'Content-Type: multipart/mixed; boundary="XX"\n', "mime-multipart"),
        (b"MIME-Version: 1.0\nContent-Type: multipart/mixed\n", "mime-multipart"),
        (b"#cloud-boothook\necho hi\n", "cloud-boothook"),
        (b"#upstart-job\n", "upstart-job"),
        (b"#cloud-config-archive\n- type: text/cloud-config\n", "cloud-config-archive"),
        (b"#part-handler\n", "part-handler"),
        (b"## template: jinja\n#cloud-config\nhostname: {{ v1.local_hostname }}\n", "jinja"),
        (b"hostname: a\n", "unknown"),
        (b"#cloud-config-jsonp\n", "unknown"),
        (b"#cloud-config extra\n", "unknown"),
        (b"  #!/bin/sh\n", "unknown"),  # the kernel needs #! as the first two bytes
    ],
)
def test_classify(data: bytes, kind: str) -> None:
    assert classify(data) == kind
    assert classify(gzip.compress(data)) == kind
    assert isinstance(classify(data), str)


def test_classify_returns_the_enum() -> None:
    assert classify(b"#!/bin/sh\n") is UserDataKind.SCRIPT


def test_broken_gzip_is_an_error_naming_the_source() -> None:
    broken = gzip.compress(b"#cloud-config\nhostname: a\n")[:-6]
    with pytest.raises(ProvisionError, match=r"^test user-data: user-data starts like gzip"):
        classify(broken, SOURCE)
    with pytest.raises(ProvisionError, match="does not decompress"):
        parse_user_data(broken, SOURCE)
    with pytest.raises(ProvisionError, match="does not decompress"):
        parse_user_data(b"\x1f\x8bnot gzip at all", SOURCE)


def test_decompress_only_gzip_and_only_once() -> None:
    assert decompress(b"#cloud-config\n", SOURCE) == b"#cloud-config\n"
    assert decompress(gzip.compress(b"{}"), SOURCE) == b"{}"
    twice = gzip.compress(gzip.compress(b"#cloud-config\n"))
    assert decompress(twice, SOURCE).startswith(b"\x1f\x8b")


@pytest.mark.parametrize("data", [b"", b"\n  \n", gzip.compress(b""), gzip.compress(b" \n")])
def test_empty_user_data_is_no_config(data: bytes) -> None:
    assert parse_user_data(data, SOURCE) is None


@pytest.mark.parametrize("compress", [False, True])
def test_script_is_run_once_as_given(compress: bool) -> None:
    script = b"#!/bin/sh\nset -e\necho provisioned > /var/lib/marker\n"
    plan = parse_user_data(gzip.compress(script) if compress else script, SOURCE)
    assert plan == Plan(source=SOURCE, format="script", script=script)


def test_gzip_cloud_config() -> None:
    plan = parse_user_data(gzip.compress(cloud_config("hostname: zipped\n")), SOURCE)
    assert plan is not None and plan.hostname == "zipped"


def test_ignition_goes_to_the_ignition_parser() -> None:
    with pytest.raises(ProvisionError, match=r"Ignition config .*the Ignition parser"):
        parse_user_data(b'{"ignition": {"version": "3.4.0"}}', SOURCE)


@pytest.mark.parametrize(
    ("data", "name", "hint"),
    [
        (b"#include\nhttps://config.example/a\n", "#include user-data", "from URLs"),
        (b"#include-once\nhttps://config.example/a\n", "#include user-data", "from URLs"),
        (b"Content-Type: multipart/mixed\n", "MIME multi-part user-data", "not a multi-part"),
        (b"MIME-Version: 1.0\n", "MIME multi-part user-data", "not a multi-part"),
        (b"#cloud-boothook\n", "#cloud-boothook user-data", "every boot"),
        (b"#upstart-job\n", "#upstart-job user-data", "systemd"),
        (b"#cloud-config-archive\n", "#cloud-config-archive user-data", "one #cloud-config"),
        (b"#part-handler\n", "#part-handler user-data", "no handlers"),
        (b"## template: jinja\n#cloud-config\n", "## template: jinja user-data", "render"),
    ],
)
def test_other_cloud_init_formats_are_refused_by_name(data: bytes, name: str, hint: str) -> None:
    with pytest.raises(ProvisionError) as error:
        parse_user_data(data, SOURCE)
    message = str(error.value)
    assert message.startswith(f"{SOURCE}: {name}: not supported by Berth (")
    assert hint in message


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        (b"hostname: a\n", "'hostname: a'"),
        (b"#cloud-config-jsonp\n{}\n", "'#cloud-config-jsonp'"),
        (b"#cloud-confg\nhostname: a\n", "'#cloud-confg'"),
    ],
)
def test_anything_else_is_refused(data: bytes, shown: str) -> None:
    with pytest.raises(ProvisionError) as error:
        parse_user_data(data, SOURCE)
    assert str(error.value) == (
        f"{SOURCE}: expected a config starting with #cloud-config, #! or an Ignition JSON "
        f"object, got {shown}"
    )


def test_script_with_leading_blank_is_explained() -> None:
    with pytest.raises(ProvisionError, match="a #! script must start with #!"):
        parse_user_data(b"\n#!/bin/sh\necho hi\n", SOURCE)


# ---- cloud-config as a document ---------------------------------------------------------------


@pytest.mark.parametrize("body", ["", "# only a comment\n", "\n\n"])
def test_empty_cloud_config_asks_for_nothing(body: str) -> None:
    assert parse(body) == Plan(source=SOURCE, format="cloud-config")


def test_invalid_yaml_names_the_line() -> None:
    message = refused("hostname: a\nwrite_files:\n  - path: /etc/a\n   content: [\n")
    assert "cloud-config is not valid YAML: line 5" in message


def test_invalid_yaml_tab_indentation() -> None:
    message = refused("runcmd:\n\t- true\n")
    assert "not valid YAML: line 3, column 1:" in message


def test_yaml_nested_too_deeply() -> None:
    # Found by tests/test_fuzz_provision.py: PyYAML's RecursionError escaped.
    message = refused("hostname: " + "[" * 50_000 + "]" * 50_000 + "\n")
    assert "cloud-config is not valid YAML: nested too deeply" in message


def test_write_files_content_with_a_lone_surrogate() -> None:
    # Found by tests/test_fuzz_provision.py: content.encode() raised UnicodeEncodeError.
    message = refused('write_files:\n  - path: /etc/a\n    content: "\\ud800\\udc00"\n')
    assert "write_files[0].content: expected text that is valid Unicode" in message


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('runcmd: ["echo \\ud800"]\n', "runcmd[0]"),
        ('write_files: [{path: "/etc/a\\ud800", content: x}]\n', "write_files[0].path"),
        ('ssh_authorized_keys: ["ssh-ed25519 AAAA \\udcff"]\n', "ssh_authorized_keys[0]"),
    ],
)
def test_a_lone_surrogate_anywhere_is_refused_naming_the_field(body: str, field: str) -> None:
    # The parser took these, and writing the plan would have failed half-way.
    assert f"{field}: expected text that is valid Unicode" in refused(body)


def test_yaml_integer_too_long() -> None:
    # Found by tests/test_fuzz_provision.py: int()'s ValueError escaped through PyYAML.
    message = refused("hostname: 1" + "0" * 5000 + "\n")
    assert "cloud-config is not valid YAML: Exceeds the limit (4300 digits)" in message


@pytest.mark.parametrize("body", ["- hostname: a\n", "just text\n", "42\n"])
def test_cloud_config_must_be_a_mapping(body: str) -> None:
    assert "cloud-config: expected a mapping of keys" in refused(body)


def test_cloud_config_must_be_utf8() -> None:
    with pytest.raises(ProvisionError, match="not UTF-8 text"):
        parse_user_data(b"#cloud-config\nhostname: caf\xe9\n", SOURCE)


def test_keys_must_be_strings() -> None:
    assert "cloud-config: expected keys that are strings, got 1" in refused("1: one\n")


def test_windows_line_endings() -> None:
    plan = parse_user_data(b"#cloud-config\r\nhostname: crlf\r\n", SOURCE)
    assert plan is not None and plan.hostname == "crlf"


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("packages: [nginx]", "Berth's root is read-only; run software in containers"),
        ("package_update: true", "run software in containers"),
        ("package_upgrade: true", "run software in containers"),
        ("apt: {}", "run software in containers"),
        ("yum_repos: {}", "run software in containers"),
        ("snap: {}", "run software in containers"),
        ("bootcmd: [echo]", "use runcmd"),
        ("mounts: []", ".mount unit"),
        ("swap: {}", ".swap unit"),
        ("ntp: {enabled: true}", "timesyncd"),
        ("timezone: Europe/Berlin", "UTC"),
        ("user: {name: bob}", "the default user is root"),
        ("groups: [admins]", "users[].groups"),
        ("password: secret", "crypt(3) hash"),
        ("chpasswd: {expire: false}", "crypt(3) hash"),
        ("ssh_pwauth: true", "sshd_config.d"),
        ("disable_root: false", "root is Berth's login user"),
        ("ssh_import_id: [gh:someone]", "ssh_authorized_keys"),
        ("ssh_keys: {}", "host keys"),
        ("manage_etc_hosts: true", "/etc/hosts"),
        ("growpart: {mode: auto}", "grows STATE"),
        ("resize_rootfs: true", "grows STATE"),
        ("disk_setup: {}", "grows STATE"),
        ("fs_setup: []", "grows STATE"),
    ],
)
def test_unsupported_keys_are_refused_with_a_hint(key: str, hint: str) -> None:
    name = key.split(":")[0]
    message = refused(f"hostname: a\n{key}\n")
    assert message.startswith(f"{SOURCE}: {name}: not supported by Berth (")
    assert hint in message


@pytest.mark.parametrize("key", ["final_message: hi", "phone_home: {}", "hostnme: typo"])
def test_unknown_keys_are_refused_by_name(key: str) -> None:
    name = key.split(":")[0]
    assert refused(key + "\n") == f"{SOURCE}: {name}: not supported by Berth"


# ---- hostname ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "hostname", "note"),
    [
        ("hostname: web-1\n", "web-1", None),
        ("hostname: web-1\npreserve_hostname: false\n", "web-1", None),
        ("fqdn: web-1.example.com\n", "web-1", "the first label of fqdn 'web-1.example.com'"),
        ("hostname: web-1.example.com\n", "web-1", "of hostname 'web-1.example.com'"),
        ("hostname: web\nfqdn: web-1.example.com\n", "web", None),  # cloud-init: hostname wins
        ("fqdn: web-1.example.com\nprefer_fqdn_over_hostname: false\n", "web-1", "first label"),
        ("preserve_hostname: true\nhostname: web-1\n", None, "stays as it is, not 'web-1'"),
        ("preserve_hostname: true\n", None, None),
    ],
)
def test_hostname(body: str, hostname: str | None, note: str | None) -> None:
    plan = parse(body)
    assert plan.hostname == hostname
    if note is None:
        assert plan.notes == ()
    else:
        assert len(plan.notes) == 1 and note in plan.notes[0]


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ("hostname: -web\n", "hostname"),
        ("hostname: web_1\n", "hostname"),
        ("hostname: 'web..example'\n", "hostname"),
        ("hostname: 'web.'\n", "hostname"),
        ("hostname: 42\n", "hostname"),
        ("hostname:\n", "hostname"),
        (f"hostname: {'a' * 64}\n", "hostname"),
        ("fqdn: web.exa mple.com\n", "fqdn"),
        (f"fqdn: {'.'.join(['a' * 60] * 5)}\n", "fqdn"),  # longer than 253
        ("hostname: web\nfqdn: [web]\n", "fqdn"),
    ],
)
def test_bad_hostnames(body: str, path: str) -> None:
    assert f"{SOURCE}: {path}: expected a host name" in refused(body)


@pytest.mark.parametrize("key", ["preserve_hostname", "prefer_fqdn_over_hostname"])
def test_hostname_flags_are_booleans(key: str) -> None:
    assert f"{key}: expected true or false, got 'yes please'" in refused(f"{key}: yes please\n")


def test_prefer_fqdn_over_hostname_is_refused() -> None:
    message = refused("fqdn: web-1.example.com\nprefer_fqdn_over_hostname: true\n")
    assert message.startswith(f"{SOURCE}: prefer_fqdn_over_hostname: not supported by Berth")
    assert "one label" in message


# ---- users ------------------------------------------------------------------------------------


def test_default_user_is_root_and_needs_nothing() -> None:
    assert parse("users: [default]\n").users == ()


def test_top_level_keys_go_to_root() -> None:
    plan = parse(f"ssh_authorized_keys:\n  - {KEY}\n  - '  {KEY2}  '\n")
    assert plan.users == (User("root", ssh_authorized_keys=(KEY, KEY2)),)


def test_root_in_users_merges_with_top_level_keys() -> None:
    plan = parse(
        f"""\
        ssh_authorized_keys: ["{KEY}"]
        users:
          - default
          - name: root
            ssh_authorized_keys: ["{KEY}", "{KEY2}"]
            groups: [adm]
        """
    )
    assert plan.users == (User("root", ssh_authorized_keys=(KEY, KEY2), groups=("adm",)),)


def test_full_user() -> None:
    plan = parse(
        f"""\
        users:
          - default
          - name: deploy
            ssh_authorized_keys:
              - {KEY}
            groups: [adm, systemd-journal]
            passwd: "{HASH}"
            lock_passwd: false
          - name: ops
            groups: "adm, systemd-journal,adm"
            hashed_passwd: "{HASH}"
            lock_passwd: false
        """
    )
    assert plan.users == (
        User("deploy", (KEY,), ("adm", "systemd-journal"), HASH),
        User("ops", (), ("adm", "systemd-journal"), HASH),
    )
    assert plan.notes == ()


def test_user_names_as_strings() -> None:
    plan = parse("users: [default, 'alice,', 'bob, carol', 'default, dave', '']\n")
    assert [u.name for u in plan.users] == ["alice", "bob", "carol", "dave"]
    assert all(u == User(u.name) for u in plan.users)


def test_password_is_locked_by_default_as_in_cloud_init() -> None:
    plan = parse(f'users:\n  - name: deploy\n    passwd: "{HASH}"\n')
    assert plan.users == (User("deploy", password_hash="!" + HASH),)
    assert len(plan.notes) == 1
    assert "users[0].passwd: deploy's password is locked" in plan.notes[0]
    assert "lock_passwd: false" in plan.notes[0]
    explicit = parse(f'users:\n  - name: deploy\n    passwd: "{HASH}"\n    lock_passwd: true\n')
    assert explicit.users == plan.users


def test_lock_passwd_true_without_password() -> None:
    assert parse("users:\n  - name: deploy\n    lock_passwd: true\n").users == (User("deploy"),)


def test_unlocking_without_a_password_is_refused() -> None:
    message = refused("users:\n  - name: deploy\n    lock_passwd: false\n")
    assert "users[0].lock_passwd: expected true unless passwd gives a crypt(3) hash" in message


@pytest.mark.parametrize(
    "value", ["hunter2", "'$6$no spaces allowed'", "'$6$a:b'", "'abcDEF0123./x'"]
)
def test_passwd_must_be_a_hash_and_is_never_echoed(value: str) -> None:
    message = refused(f"users:\n  - name: deploy\n    passwd: {value}\n    lock_passwd: false\n")
    assert "users[0].passwd: expected a crypt(3) hash" in message
    assert value.strip("'") not in message


def test_passwd_of_another_type() -> None:
    assert "users[0].hashed_passwd: expected a crypt(3) hash" in refused(
        "users:\n  - name: deploy\n    hashed_passwd: 1234\n"
    )


def test_passwd_and_hashed_passwd_together() -> None:
    message = refused(f'users:\n  - name: d\n    passwd: "{HASH}"\n    hashed_passwd: "{HASH}"\n')
    assert "users[0].hashed_passwd: expected only one of passwd and hashed_passwd" in message


@pytest.mark.parametrize(
    "key",
    [
        "sudo: ALL=(ALL) NOPASSWD:ALL",
        "shell: /bin/bash",
        "uid: 1001",
        "homedir: /home/d",
        "primary_group: d",
        "system: true",
        "gecos: Deploy",
        "ssh_import_id: [gh:someone]",
        "plain_text_passwd: secret",
        "doas: [permit d]",
        "create_groups: false",
        "no_create_home: true",
        "expiredate: '2032-09-01'",
        "inactive: '5'",
        "selinux_user: staff_u",
        "ssh_redirect_user: true",
    ],
)
def test_unsupported_user_keys_are_refused_by_name(key: str) -> None:
    name = key.split(":")[0]
    message = refused(f"users:\n  - default\n  - name: d\n    {key}\n")
    assert message.startswith(f"{SOURCE}: users[1].{name}: not supported by Berth")


def test_sudo_hint() -> None:
    assert "the sudo group" in refused("users:\n  - name: d\n    sudo: true\n")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("users: default\n", "users: expected a list"),
        ("users: {name: d}\n", "users: expected a list"),
        ("users:\n  - 42\n", "users[0]: expected 'default', a user name or a mapping"),
        ("users:\n  - [d]\n", "users[0]: expected 'default', a user name or a mapping"),
        (
            "users:\n  - groups: [adm]\n",
            "users[0].name: expected a user name (the key is required)",
        ),
        ("users:\n  - name: Deploy\n", "users[0].name: expected a user name"),
        ("users:\n  - name: 1d\n", "users[0].name: expected a user name"),
        ("users:\n  - name: [d]\n", "users[0].name: expected a user name"),
        ("users: [default, 'Bob']\n", "users[1]: expected a user name"),
        ("users: [d, {name: d}]\n", "users[1].name: expected each user listed once, got 'd'"),
        ("users: [root, root]\n", "users[1]: expected each user listed once"),
        (
            "users:\n  - name: d\n    ssh_authorized_keys: key\n",
            ".ssh_authorized_keys: expected a list",
        ),
        (
            "users:\n  - name: d\n    ssh_authorized_keys: [42]\n",
            "ssh_authorized_keys[0]: expected an SSH",
        ),
        (
            "users:\n  - name: d\n    ssh_authorized_keys: ['']\n",
            "ssh_authorized_keys[0]: expected an SSH",
        ),
        (
            "users:\n  - name: d\n    groups: {adm: x}\n",
            "users[0].groups: expected a list of group names",
        ),
        (
            "users:\n  - name: d\n    groups: [adm, Wheel]\n",
            "users[0].groups[1]: expected a group name",
        ),
        (
            "users:\n  - name: d\n    groups: 'adm,,x'\n",
            "users[0].groups[1]: expected a group name",
        ),
        (
            "users:\n  - name: d\n    lock_passwd: 'no'\n",
            "users[0].lock_passwd: expected true or false",
        ),
        ("ssh_authorized_keys: key\n", "ssh_authorized_keys: expected a list"),
        (
            'ssh_authorized_keys: ["a\\nb"]\n',
            "ssh_authorized_keys[0]: expected an SSH public key on one",
        ),
    ],
)
def test_bad_users(body: str, expected: str) -> None:
    assert expected in refused(body)


# ---- write_files ------------------------------------------------------------------------------


def test_write_files_text() -> None:
    plan = parse(
        """\
        write_files:
          - path: /etc/containers/systemd/web.container
            content: |
              [Container]
              Image=docker.io/library/nginx:1.27
            permissions: '0640'
            owner: root:root
          - path: /var/lib/empty
          - path: /etc/motd
            content:
            encoding: text/plain
            owner: root
        """
    )
    assert plan.files == (
        File(
            "/etc/containers/systemd/web.container",
            b"[Container]\nImage=docker.io/library/nginx:1.27\n",
            mode=0o640,
            overwrite=True,
        ),
        File("/var/lib/empty", b"", overwrite=True),
        File("/etc/motd", b"", overwrite=True),
    )


def test_write_files_utf8() -> None:
    plan = parse("write_files:\n  - path: /etc/motd\n    content: 'Grüße ⚓'\n")
    assert plan.files[0].contents == "Grüße ⚓".encode()


PAYLOAD = b"\x00binary\xffpayload\n" * 20


@pytest.mark.parametrize("encoding", ["b64", "base64", "B64", " Base64 "])
def test_write_files_base64(encoding: str) -> None:
    wrapped = "\n".join(textwrap.wrap(base64.b64encode(PAYLOAD).decode(), 60))
    content = textwrap.indent(wrapped, "      ")
    plan = parse(
        f"write_files:\n  - path: /etc/a\n    encoding: '{encoding}'\n    content: |\n{content}\n"
    )
    assert plan.files == (File("/etc/a", PAYLOAD, overwrite=True),)


@pytest.mark.parametrize("encoding", ["gz", "gzip", "GZIP"])
def test_write_files_gzip_binary(encoding: str) -> None:
    binary = base64.b64encode(gzip.compress(PAYLOAD)).decode()
    entry = f"path: /etc/a, encoding: {encoding}, content: !!binary {binary}"
    plan = parse(f"write_files:\n  - {{{entry}}}\n")
    assert plan.files == (File("/etc/a", PAYLOAD, overwrite=True),)


@pytest.mark.parametrize("encoding", ["gz+b64", "gzip+base64", "gz+base64", "gzip+b64"])
def test_write_files_gzip_base64(encoding: str) -> None:
    text = base64.b64encode(gzip.compress(PAYLOAD)).decode()
    plan = parse(f"write_files:\n  - path: /etc/a\n    encoding: {encoding}\n    content: {text}\n")
    assert plan.files == (File("/etc/a", PAYLOAD, overwrite=True),)


def test_write_files_binary_without_encoding() -> None:
    binary = base64.b64encode(PAYLOAD).decode()
    plan = parse(f"write_files:\n  - path: /etc/a\n    content: !!binary {binary}\n")
    assert plan.files[0].contents == PAYLOAD


@pytest.mark.parametrize(
    ("permissions", "mode"),
    [
        (None, 0o644),
        ("'0600'", 0o600),
        ("'600'", 0o600),
        ("'0o750'", 0o750),
        ("'4755'", 0o4755),
        ("0755", 0o755),  # YAML 1.1 reads an unquoted leading 0 as octal
        ("0", 0),
        ("420", 0o644),
    ],
)
def test_write_files_permissions(permissions: str | None, mode: int) -> None:
    line = "" if permissions is None else f"    permissions: {permissions}\n"
    plan = parse(f"write_files:\n  - path: /etc/a\n    content: x\n{line}")
    assert plan.files[0].mode == mode


def test_append_and_defer() -> None:
    plan = parse(
        """\
        write_files:
          - path: /etc/environment
            content: "A=1\\n"
            append: true
            defer: true
          - path: /etc/b
            content: b
            append: false
            defer: false
        """
    )
    assert plan.files == (
        File("/etc/environment", b"A=1\n", overwrite=True, append=True),
        File("/etc/b", b"b", overwrite=True),
    )


def test_entries_for_one_path_are_written_in_order() -> None:
    plan = parse(
        """\
        write_files:
          - {path: /etc/a, content: "1\\n", permissions: '0600'}
          - {path: /etc/a, content: "2\\n", append: true, permissions: '0640'}
          - {path: /etc/c, content: "x", append: true}
          - {path: /etc/c, content: "y", append: true}
        """
    )
    assert plan.files == (
        File("/etc/a", b"1\n2\n", mode=0o640, overwrite=True),
        File("/etc/c", b"xy", overwrite=True, append=True),
    )


def test_a_second_entry_that_would_replace_the_first_is_refused_naming_both() -> None:
    # cloud-init would silently drop the first entry's content; Berth names both entries.
    with pytest.raises(ProvisionError) as e:
        parse(
            """\
            write_files:
              - {path: /etc/b, content: "old"}
              - {path: /etc/a, content: "a"}
              - {path: /etc/b, content: "new"}
            """
        )
    assert "write_files[2] and write_files[0] both write /etc/b" in str(e.value)
    assert "append: true" in str(e.value)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("{path: /etc/a, permissions: 644}", "write_files[2].permissions: expected a quoted octal"),
        (
            "{path: /etc/a, permissions: '0999'}",
            "write_files[2].permissions: expected an octal mode",
        ),
        ("{path: /etc/a, permissions: '10000'}", "write_files[2].permissions: expected an octal"),
        ("{path: /etc/a, permissions: rw-r--r--}", "write_files[2].permissions: expected an octal"),
        ("{path: /etc/a, permissions: true}", "write_files[2].permissions: expected an octal"),
        ("{path: /etc/a, permissions: 0.5}", "write_files[2].permissions: expected an octal"),
        ("{path: /etc/a, permissions: -1}", "write_files[2].permissions: expected a quoted"),
        ("{content: x}", "write_files[2].path: expected an absolute path (the key is required)"),
        ("{path: etc/a}", "write_files[2].path: expected an absolute path"),
        ("{path: /etc/../usr/a}", "write_files[2].path: expected a normalised absolute path"),
        ("{path: /usr/local/bin/a}", "write_files[2].path: expected a path under /etc, /var"),
        ("{path: /tmp/a}", "write_files[2].path: expected a path under"),
        ("{path: 42}", "write_files[2].path: expected an absolute path"),
        ("{path: /etc/a, content: 42}", "write_files[2].content: expected a string, or !!binary"),
        ("{path: /etc/a, content: [a]}", "write_files[2].content: expected a string"),
        ("{path: /etc/a, encoding: rot13}", "write_files[2].encoding: expected text/plain, b64,"),
        ("{path: /etc/a, encoding: 64}", "write_files[2].encoding: expected text/plain"),
        (
            "{path: /etc/a, encoding: b64, content: 'not base64!'}",
            "write_files[2].content: expected base64",
        ),
        (
            "{path: /etc/a, encoding: b64, content: 'YWJ'}",
            "write_files[2].content: expected base64",
        ),
        (
            "{path: /etc/a, encoding: gzip, content: text}",
            "write_files[2].content: expected !!binary bytes with encoding gzip",
        ),
        (
            "{path: /etc/a, encoding: gz+b64, content: YWJj}",
            "write_files[2].content: expected gzip data",
        ),
        (
            "{path: /etc/a, encoding: gzip, content: !!binary YWJj}",
            "write_files[2].content: expected gzip data",
        ),
        ("{path: /etc/a, owner: 0}", "write_files[2].owner: expected 'root' or 'root:root'"),
        ("{path: /etc/a, append: 'yes'}", "write_files[2].append: expected true or false"),
        ("{path: /etc/a, defer: 1}", "write_files[2].defer: expected true or false"),
        ("/etc/a", "write_files[2]: expected a mapping with path and content"),
    ],
)
def test_bad_write_files(entry: str, expected: str) -> None:
    body = f"write_files:\n  - {{path: /etc/x}}\n  - {{path: /etc/y}}\n  - {entry}\n"
    assert f"{SOURCE}: {expected}" in refused(body)


@pytest.mark.parametrize("owner", ["nginx", "nginx:nginx", "root:adm", "0:0"])
def test_write_files_owner_other_than_root(owner: str) -> None:
    message = refused(f"write_files:\n  - path: /etc/a\n    owner: '{owner}'\n")
    assert message.startswith(f"{SOURCE}: write_files[0].owner: not supported by Berth (")
    assert "files belong to root" in message


@pytest.mark.parametrize(
    ("key", "hint"), [("source: {uri: 'https://x'}", "content"), ("user: x", "")]
)
def test_write_files_unknown_keys(key: str, hint: str) -> None:
    message = refused(f"write_files:\n  - path: /etc/a\n    {key}\n")
    assert message.startswith(f"{SOURCE}: write_files[0].{key.split(':')[0]}: not supported")
    assert hint in message


def test_write_files_must_be_a_list() -> None:
    assert "write_files: expected a list" in refused("write_files: {path: /etc/a}\n")


# ---- runcmd -----------------------------------------------------------------------------------


def test_runcmd() -> None:
    plan = parse(
        """\
        runcmd:
          - systemctl daemon-reload && echo done > /var/log/first
          - [systemctl, start, --no-block, web.service]
          - [sleep, 5]
          - - sh
            - -c
            - echo "$HOME"
        """
    )
    assert plan.commands == (
        Command(shell="systemctl daemon-reload && echo done > /var/log/first"),
        Command(argv=("systemctl", "start", "--no-block", "web.service")),
        Command(argv=("sleep", "5")),
        Command(argv=("sh", "-c", 'echo "$HOME"')),
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("runcmd: echo hi\n", "runcmd: expected a list"),
        ("runcmd:\n  - ''\n", "runcmd[0]: expected a shell command (string) or an argument list"),
        ("runcmd:\n  - []\n", "runcmd[0]: expected a shell command"),
        ("runcmd:\n  - {a: b}\n", "runcmd[0]: expected a shell command"),
        ("runcmd:\n  - 42\n", "runcmd[0]: expected a shell command"),
        ("runcmd:\n  - true\n  - [echo, [x]]\n", "runcmd[0]: expected a shell command"),
        ("runcmd:\n  - [echo, [x]]\n", "runcmd[0][1]: expected a string"),
        ("runcmd:\n  - [echo, true]\n", "runcmd[0][1]: expected a string, got True"),
        ("runcmd:\n  - [echo, null]\n", "runcmd[0][1]: expected a string"),
    ],
)
def test_bad_runcmd(body: str, expected: str) -> None:
    assert f"{SOURCE}: {expected}" in refused(body)


# ---- the documented example -------------------------------------------------------------------


def test_documented_example() -> None:
    plan = parse(
        f"""\
        hostname: web-1
        ssh_authorized_keys:
          - {KEY}
        write_files:
          - path: /etc/containers/systemd/web.container
            content: |
              [Unit]
              Description=nginx

              [Container]
              Image=docker.io/library/nginx:1.27
              PublishPort=80:80

              [Install]
              WantedBy=multi-user.target
        runcmd:
          - [systemctl, daemon-reload]
          - [systemctl, start, --no-block, web.service]
        """
    )
    assert plan.hostname == "web-1"
    assert plan.users == (User("root", ssh_authorized_keys=(KEY,)),)
    assert [(f.path, f.mode, f.overwrite) for f in plan.files] == [
        ("/etc/containers/systemd/web.container", 0o644, True)
    ]
    assert b"PublishPort=80:80\n" in plan.files[0].contents
    assert plan.commands == (
        Command(argv=("systemctl", "daemon-reload")),
        Command(argv=("systemctl", "start", "--no-block", "web.service")),
    )
    assert plan.notes == ()
