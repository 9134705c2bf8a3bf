"""Two parts of one config that write one path: refused with both named, or merged where the
format says so (SSH keys after an authorized_keys file), never one silently dropped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.test_provision_apply import HTTPD, root  # noqa: F401  (the machine fixture)
from updater.provision.__main__ import _with_meta_hostname, parse_config
from updater.provision.apply import apply_plan
from updater.provision.plan import File, Plan, ProvisionError, Unit

SOURCE = "test config"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtbGYM1FMgVHE1DX1d8bzqf7ICcRoM2O1ZEGMGA0jmg op@laptop"


def ignition(**sections: Any) -> bytes:
    return json.dumps({"ignition": {"version": "3.4.0"}, **sections}).encode()


def file(path: str, text: str = "x") -> dict[str, Any]:
    return {"path": path, "contents": {"source": "data:," + text}}


def refusal(data: bytes) -> str:
    with pytest.raises(ProvisionError) as info:
        parse_config(data, SOURCE)
    return str(info.value)


@pytest.mark.parametrize(
    ("data", "later", "earlier"),
    [
        (
            ignition(
                storage={"files": [file("/etc/x"), file("/etc/systemd/system/a.service")]},
                systemd={"units": [{"name": "a.service", "contents": "[Service]\n"}]},
            ),
            "systemd.units[0]",
            "storage.files[1] writes /etc/systemd/system/a.service",
        ),
        (
            ignition(
                storage={"files": [file("/etc/systemd/system/a.service.d/10-x.conf")]},
                systemd={"units": [{"name": "a.service", "dropins": [{"name": "10-x.conf"}]}]},
            ),
            "systemd.units[0].dropins[0]",
            "storage.files[0] writes /etc/systemd/system/a.service.d/10-x.conf",
        ),
        (
            ignition(
                storage={"files": [file("/etc/systemd/system/m.service")]},
                systemd={"units": [{"name": "m.service", "mask": True}]},
            ),
            "systemd.units[0]",
            "storage.files[0] writes",
        ),
        (
            ignition(storage={"files": [file("/etc/passwd")]}, passwd={"users": [{"name": "a"}]}),
            "passwd.users[0] (accounts are written to /etc/passwd)",
            "storage.files[0] writes /etc/passwd",
        ),
        (
            ignition(storage={"files": [file("/etc/gshadow")]}, passwd={"users": [{"name": "a"}]}),
            "passwd.users[0] (accounts are written to /etc/gshadow)",
            "storage.files[0] writes /etc/gshadow",
        ),
        (
            ignition(
                storage={"files": [file("/home/alice")]}, passwd={"users": [{"name": "alice"}]}
            ),
            "passwd.users[0] (its home)",
            "storage.files[0] writes /home/alice",
        ),
        (
            ignition(
                storage={"directories": [{"path": "/home/alice"}]},
                passwd={"users": [{"name": "alice"}]},
            ),
            "passwd.users[0] (its home)",
            "storage.directories[0] writes /home/alice",
        ),
        (
            # Through the config's own link, two files are one.
            ignition(
                storage={
                    "files": [file("/etc/a/x"), file("/etc/b/x")],
                    "links": [{"path": "/etc/a", "target": "/etc/b"}],
                }
            ),
            "storage.files[1]",
            "storage.files[0] writes /etc/a/x too (both lead to /etc/b/x)",
        ),
    ],
)
def test_two_entries_for_one_path_are_refused_naming_both(
    data: bytes, later: str, earlier: str
) -> None:
    message = refusal(data)
    assert message.startswith(f"{SOURCE} (Ignition 3.4.0): {later}: expected a path of its own")
    assert earlier in message


@pytest.mark.parametrize(
    ("data", "later", "earlier"),
    [
        (
            ignition(storage={"files": [file("/etc/a"), file("/etc/a/b")]}),
            "storage.files[1]",
            "storage.files[0] makes /etc/a a file",
        ),
        (
            ignition(storage={"files": [file("/etc/a")], "directories": [{"path": "/etc/a/d"}]}),
            "storage.directories[0]",
            "storage.files[0] makes /etc/a a file",
        ),
        (
            ignition(
                storage={
                    "files": [file("/etc/f"), file("/etc/h/x")],
                    "links": [{"path": "/etc/h", "target": "/etc/f", "hard": True}],
                }
            ),
            "storage.files[1]",
            "storage.links[0] makes /etc/h a link",
        ),
        (
            # A symbolic link of the config to one of its files: the file is then a parent.
            ignition(
                storage={
                    "files": [file("/etc/f"), file("/etc/s/x")],
                    "links": [{"path": "/etc/s", "target": "f"}],
                }
            ),
            "storage.files[1]",
            "storage.files[0] makes /etc/f a file",
        ),
        (
            ignition(
                storage={"files": [file("/home/alice/.ssh")]},
                passwd={"users": [{"name": "alice", "sshAuthorizedKeys": [KEY]}]},
            ),
            "passwd.users[0] (its ~/.ssh)",
            "storage.files[0] writes /home/alice/.ssh",
        ),
    ],
)
def test_an_entry_under_a_file_or_link_is_refused_naming_both(
    data: bytes, later: str, earlier: str
) -> None:
    message = refusal(data)
    assert f"{later}: expected " in message and earlier in message


@pytest.mark.parametrize(
    ("body", "later", "earlier"),
    [
        (
            "hostname: web-1\nwrite_files: [{path: /etc/hostname, content: x}]\n",
            "write_files[0]",
            "hostname writes /etc/hostname",
        ),
        (
            "fqdn: web-1.example.com\nwrite_files: [{path: /etc/hostname, content: x}]\n",
            "write_files[0]",
            "fqdn writes /etc/hostname",
        ),
        (
            "users: [alice]\nwrite_files: [{path: /etc/shadow, content: x}]\n",
            "users[0] (accounts are written to /etc/shadow)",
            "write_files[0] writes /etc/shadow",
        ),
        (
            "users: [alice]\nwrite_files: [{path: /home/alice, content: x}]\n",
            "users[0] (its home)",
            "write_files[0] writes /home/alice",
        ),
    ],
)
def test_cloud_config_collisions_name_both(body: str, later: str, earlier: str) -> None:
    message = refusal(b"#cloud-config\n" + body.encode())
    assert later in message and earlier in message


def test_a_cloud_config_file_written_twice_is_refused_naming_both() -> None:
    with pytest.raises(ProvisionError, match=r"write_files\[1\] and write_files\[0\] both write"):
        parse_config(
            b"#cloud-config\n"
            b"write_files: [{path: /etc/b, content: old}, {path: /etc/b, content: new}]\n",
            SOURCE,
        )


def test_a_file_under_a_new_users_home_leaves_the_home_theirs(root: Path) -> None:  # noqa: F811
    plan = parse_config(
        ignition(
            storage={"files": [file("/home/alice/.config/app.conf"), file("/home/alice/.ssh/rc")]},
            passwd={"users": [{"name": "alice", "sshAuthorizedKeys": [KEY]}]},
        ),
        SOURCE,
    )
    assert plan is not None
    apply_plan(plan, root)
    home = (root / "home/alice").stat()
    assert (home.st_uid, home.st_mode & 0o777) == (1000, 0o700)
    ssh = (root / "home/alice/.ssh").stat()
    assert (ssh.st_uid, ssh.st_mode & 0o777) == (1000, 0o700)
    assert (root / "home/alice/.config/app.conf").read_bytes() == b"x"


def test_root_keys_are_appended_to_an_authorized_keys_file_of_the_config(
    root: Path,  # noqa: F811
) -> None:
    plan = parse_config(
        ignition(
            storage={"files": [file("/root/.ssh/authorized_keys", "ssh-rsa%20AAAAfile%20f%0A")]},
            passwd={"users": [{"name": "root", "sshAuthorizedKeys": [KEY]}]},
        ),
        SOURCE,
    )
    assert plan is not None
    # overwrite is false and the harness's key file is there: that refusal still stands.
    with pytest.raises(ProvisionError, match="exists and overwrite is false"):
        apply_plan(plan, root)
    (root / "root/.ssh/authorized_keys").unlink()
    apply_plan(plan, root)
    keys = root / "root/.ssh/authorized_keys"
    assert keys.read_text() == f"ssh-rsa AAAAfile f\n{KEY}\n"
    assert keys.stat().st_mode & 0o777 == 0o600
    assert not list(root.rglob(".berth-provision.*"))


def test_an_enablement_link_and_a_file_at_its_path_are_refused_at_staging(
    root: Path,  # noqa: F811
) -> None:
    wants = "/etc/systemd/system/multi-user.target.wants/ok.service"
    plan = Plan(
        source=SOURCE,
        format="ignition",
        files=(File(wants, b"x", where="storage.files[0]"),),
        units=(Unit("ok.service", HTTPD, enabled=True, where="systemd.units[0]"),),
    )
    with pytest.raises(
        ProvisionError, match=f"unit ok.service: {wants} is written by file {wants}"
    ):
        apply_plan(plan, root)
    assert not (root / "etc/systemd/system/ok.service").exists()


def test_meta_data_does_not_name_a_host_whose_config_writes_etc_hostname() -> None:
    plan = Plan(source="s", format="ignition", files=(File("/etc/hostname", b"a\nb\n"),))
    assert _with_meta_hostname(plan, {"local-hostname": "web-1"}) is plan
