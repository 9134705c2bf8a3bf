"""The applier: every kind of change lands as asked, and a failure anywhere changes nothing."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

import pytest

from updater.provision.apply import apply_plan, run_commands
from updater.provision.plan import (
    Command,
    Directory,
    Dropin,
    File,
    Link,
    Plan,
    ProvisionError,
    Unit,
    User,
)

PASSWD = (
    "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
)
SHADOW = "root:*:20000:0:99999:7:::\nnobody:*:20000:0:99999:7:::\n"
GROUP = "root:x:0:\nsudo:x:27:\nsystemd-journal:x:999:\nnogroup:x:65534:\n"
GSHADOW = "root:*::\nsudo:*::\nsystemd-journal:!*::\nnogroup:*::\n"

HTTPD = """[Unit]
Description=web

[Service]
ExecStart=/usr/bin/true

[Install]
WantedBy=multi-user.target
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A machine's writable tree: account databases, an image unit, root's home with a key."""
    tree = tmp_path / "root"
    for path, text, mode in (
        ("etc/passwd", PASSWD, 0o644),
        ("etc/shadow", SHADOW, 0o640),
        ("etc/group", GROUP, 0o644),
        ("etc/gshadow", GSHADOW, 0o640),
        ("etc/hostname", "localhost\n", 0o644),
        ("usr/lib/systemd/system/image.service", HTTPD, 0o644),
        ("root/.ssh/authorized_keys", "ssh-ed25519 AAAAharness harness\n", 0o600),
        ("etc/berth/existing.conf", "old\n", 0o644),
    ):
        file = tree / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text)
        file.chmod(mode)
    wants = tree / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "image.service").symlink_to("/usr/lib/systemd/system/image.service")
    (tree / "home").mkdir()
    (tree / "var/lib").mkdir(parents=True)
    return tree


def snapshot(tree: Path) -> dict[str, tuple[int, int, int, bytes | str]]:
    """Every entry of `tree`: mode, owner, group and contents (or link target)."""
    seen: dict[str, tuple[int, int, int, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                body: bytes | str = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                body = path.read_bytes()
            else:
                body = ""
            seen[str(path.relative_to(tree))] = (st.st_mode, st.st_uid, st.st_gid, body)
    return seen


def plan(**fields: object) -> Plan:
    return Plan(source="test.ign", format="ignition", **fields)  # type: ignore[arg-type]


def test_files_directories_and_links_land_with_their_modes(root: Path) -> None:
    applied = apply_plan(
        plan(
            hostname="node-1",
            directories=(Directory("/var/lib/app", 0o750),),
            files=(
                File("/etc/app/app.conf", b"key=value\n", 0o600),
                File("/var/lib/app/data", b"x"),
            ),
            links=(
                Link("/etc/app/current", "app.conf"),
                Link("/etc/app/hard", "/etc/app/app.conf", hard=True),
            ),
        ),
        root,
    )
    assert (root / "etc/hostname").read_text() == "node-1\n"
    assert (root / "etc/app/app.conf").read_bytes() == b"key=value\n"
    assert stat.S_IMODE((root / "etc/app/app.conf").stat().st_mode) == 0o600
    assert stat.S_IMODE((root / "var/lib/app").stat().st_mode) == 0o750
    assert os.readlink(root / "etc/app/current") == "app.conf"
    # The hard link was made to the staged file: after the rename both names are one inode.
    assert (root / "etc/app/hard").stat().st_ino == (root / "etc/app/app.conf").stat().st_ino
    assert not list(root.rglob(".berth-provision.*"))
    assert "file /etc/app/app.conf" in applied.summary
    assert applied.reload is False


def test_overwrite_append_and_directory_mode_of_existing_entries(root: Path) -> None:
    (root / "var/lib/app").mkdir()
    apply_plan(
        plan(
            directories=(Directory("/var/lib/app", 0o700),),
            files=(
                File("/etc/berth/existing.conf", b"new\n", overwrite=True),
                File("/etc/motd", b"one\n", append=True),
            ),
        ),
        root,
    )
    assert (root / "etc/berth/existing.conf").read_text() == "new\n"
    assert stat.S_IMODE((root / "var/lib/app").stat().st_mode) == 0o700
    apply_plan(plan(files=(File("/etc/motd", b"two\n", append=True),)), root)
    assert (root / "etc/motd").read_text() == "one\ntwo\n"


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        (plan(files=(File("/etc/berth/existing.conf", b"x"),)), "exists and overwrite is false"),
        (plan(links=(Link("/etc/berth/existing.conf", "/x"),)), "exists and overwrite is false"),
        (plan(users=(User("alice", groups=("wheel",)),)), "group 'wheel' does not exist"),
        (plan(users=(User("sudo"),)), "a group of that name already exists"),
        (plan(units=(Unit("nothing.service", enabled=True),)), "no such unit is on the image"),
        (
            plan(units=(Unit("noinstall.service", "[Service]\nExecStart=/bin/true\n", True),)),
            "no WantedBy=",
        ),
        (plan(units=(Unit("web.container", "[Container]\n", enabled=True),)), "[Install] section"),
        (plan(links=(Link("/etc/x", "/etc/missing", hard=True),)), "does not exist"),
        (plan(directories=(Directory("/etc/hostname"),)), "a file is there"),
    ],
)
def test_a_failure_late_in_staging_changes_nothing(root: Path, broken: Plan, message: str) -> None:
    # Everything before the failing part is staged first: files in new directories, a user.
    whole = Plan(
        source=broken.source,
        format=broken.format,
        hostname="changed",
        directories=(Directory("/var/lib/new/deep"),),
        files=(File("/etc/new/dir/file", b"data"), *broken.files),
        links=broken.links,
        users=(User("bob", ("ssh-ed25519 AAAAbob bob",)), *broken.users),
        units=(Unit("ok.service", HTTPD, enabled=True), *broken.units),
    )
    if broken.directories:
        whole = Plan(source="test.ign", format="ignition", directories=broken.directories)
    before = snapshot(root)
    with pytest.raises(ProvisionError, match=message.replace("[", r"\[")):
        apply_plan(whole, root)
    assert snapshot(root) == before


def test_users_are_created_with_home_keys_groups_and_password(root: Path) -> None:
    apply_plan(
        plan(
            users=(
                User(
                    "alice",
                    ("ssh-ed25519 AAAAalice alice",),
                    groups=("sudo", "systemd-journal"),
                    password_hash="$y$j9T$salt$hash",
                ),
                User("root", ("ssh-ed25519 AAAAops ops", "ssh-ed25519 AAAAharness harness")),
            )
        ),
        root,
    )
    passwd = (root / "etc/passwd").read_text().splitlines()
    assert "alice:x:1000:1000::/home/alice:/bin/bash" in passwd
    assert passwd[:2] == PASSWD.splitlines()
    assert any(
        line.startswith("alice:$y$j9T$salt$hash:")
        for line in (root / "etc/shadow").read_text().splitlines()
    )
    group = (root / "etc/group").read_text().splitlines()
    assert "sudo:x:27:alice" in group and "systemd-journal:x:999:alice" in group
    assert "alice:x:1000:" in group
    assert "sudo:*::alice" in (root / "etc/gshadow").read_text().splitlines()
    home = root / "home/alice"
    assert (home.stat().st_uid, stat.S_IMODE(home.stat().st_mode)) == (1000, 0o700)
    keys = home / ".ssh/authorized_keys"
    assert keys.read_text() == "ssh-ed25519 AAAAalice alice\n"
    assert (keys.stat().st_uid, stat.S_IMODE(keys.stat().st_mode)) == (1000, 0o600)
    # root keeps the key it had (the harness's credential) and gains the new one, once.
    assert (root / "root/.ssh/authorized_keys").read_text() == (
        "ssh-ed25519 AAAAharness harness\nssh-ed25519 AAAAops ops\n"
    )
    assert stat.S_IMODE((root / "etc/shadow").stat().st_mode) == 0o640


def test_units_are_written_enabled_masked_disabled_and_started(root: Path) -> None:
    started: list[Sequence[str]] = []
    applied = apply_plan(
        plan(
            units=(
                Unit(
                    "web.service",
                    HTTPD,
                    enabled=True,
                    dropins=(Dropin("10-env.conf", "[Service]\nEnvironment=A=1\n"),),
                ),
                Unit("image.service", enabled=False),
                Unit("unwanted.service", mask=True),
                Unit(
                    "app.container",
                    "[Container]\nImage=localhost/app\n[Install]\nWantedBy=multi-user.target\n",
                ),
                Unit("data.volume", "[Volume]\n"),
            ),
            files=(
                File(
                    "/etc/containers/systemd/db.container",
                    b"[Container]\nImage=db\n[Install]\nWantedBy=default.target\n",
                ),
            ),
        ),
        root,
        runner=started.append,
        live=False,
    )
    system = root / "etc/systemd/system"
    assert (system / "web.service").read_text() == HTTPD
    assert (system / "web.service.d/10-env.conf").read_text().endswith("A=1\n")
    assert (
        os.readlink(system / "multi-user.target.wants/web.service")
        == "/etc/systemd/system/web.service"
    )
    assert not (system / "multi-user.target.wants/image.service").is_symlink()
    assert os.readlink(system / "unwanted.service") == "/dev/null"
    assert (root / "etc/containers/systemd/app.container").is_file()
    assert (root / "etc/containers/systemd/data.volume").is_file()
    assert applied.reload is True
    assert applied.start == ("web.service", "app.service", "db.service")
    assert started == []  # not live: systemd is left alone


def test_live_apply_reloads_systemd_and_starts_units(root: Path) -> None:
    calls: list[list[str]] = []
    units = (Unit("web.service", HTTPD, enabled=True),)
    apply_plan(plan(units=units), root, runner=lambda a: calls.append(list(a)), live=True)
    assert calls == [
        ["systemctl", "daemon-reload"],
        ["systemctl", "start", "--no-block", "web.service"],
    ]


def test_an_image_unit_is_enabled_from_its_own_install_section(root: Path) -> None:
    (root / "etc/systemd/system/multi-user.target.wants/image.service").unlink()
    apply_plan(plan(units=(Unit("image.service", enabled=True),)), root, live=False)
    link = root / "etc/systemd/system/multi-user.target.wants/image.service"
    assert os.readlink(link) == "/usr/lib/systemd/system/image.service"


def test_commands_and_script_run_in_order_and_a_failure_names_the_entry(root: Path) -> None:
    out = root / "var/lib/out"
    ok = plan(
        commands=(
            Command(shell=f"echo one >> {out}"),
            Command(argv=("/bin/sh", "-c", f"echo two >> {out}")),
        ),
        script=f"#!/bin/sh\necho three >> {out}\n".encode(),
    )
    run_commands(ok, root)
    assert out.read_text() == "one\ntwo\nthree\n"
    with pytest.raises(ProvisionError, match=r"runcmd\[1\] failed: .*exited with status 3"):
        commands = (
            Command(shell="true"),
            Command(shell="exit 3"),
            Command(shell=f"echo no >> {out}"),
        )
        run_commands(plan(commands=commands), root)
    assert out.read_text() == "one\ntwo\nthree\n"
