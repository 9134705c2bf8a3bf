"""The applier: every kind of change lands as asked, and a failure anywhere changes nothing."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path

import pytest

from updater.provision.__main__ import check
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


# -- the writable roots, after links: nothing is written outside /etc, /var, /home and /root ------

OUTSIDE = (
    "expected a path that stays under /etc, /var, /home, /root once symbolic links on this "
    "machine are followed, but"
)


def refused(root: Path, broken: Plan) -> str:
    """The refusal of `broken`, checking that it changed nothing under `root`."""
    before = snapshot(root)
    with pytest.raises(ProvisionError) as info:
        apply_plan(broken, root)
    assert snapshot(root) == before
    return str(info.value)


@pytest.fixture
def linked(root: Path) -> Path:
    """Links a real machine has: /var/run to /run, and some into the read-only /usr."""
    (root / "usr/lib/app").mkdir(parents=True)
    (root / "run").mkdir()
    (root / "var/run").symlink_to("/run")  # as on Debian
    (root / "etc/app").symlink_to("/usr/lib/app")
    (root / "etc/up").symlink_to("../../../../usr/lib")  # climbs above / and stops there
    (root / "etc/data").symlink_to("/var/lib/data")
    return root


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        (
            plan(files=(File("/etc/app/app.conf", b"x"),)),
            "file /etc/app/app.conf: {} /etc/app/app.conf leads to /usr/lib/app/app.conf through "
            "/etc/app -> /usr/lib/app",
        ),
        (
            plan(files=(File("/var/run/app.pid", b"1"),)),
            "file /var/run/app.pid: {} /var/run/app.pid leads to /run/app.pid through "
            "/var/run -> /run",
        ),
        (
            plan(files=(File("/etc/up/x", b"x"),)),
            "file /etc/up/x: {} /etc/up/x leads to /usr/lib/x through /etc/up -> "
            "../../../../usr/lib",
        ),
        (
            plan(directories=(Directory("/etc/app", 0o777),)),  # chmod through the link
            "directory /etc/app: {} /etc/app leads to /usr/lib/app through /etc/app -> "
            "/usr/lib/app",
        ),
        (
            plan(directories=(Directory("/var/run/app"),)),
            "directory /var/run/app: {} /var/run/app leads to /run/app through /var/run -> /run",
        ),
        (
            plan(links=(Link("/var/run/link", "x"),)),
            "link /var/run/link: {} /var/run/link leads to /run/link through /var/run -> /run",
        ),
        (
            plan(links=(Link("/etc/hard", "/etc/app/lib.so", hard=True),)),
            "link /etc/hard target: {} /etc/app/lib.so leads to /usr/lib/app/lib.so through "
            "/etc/app -> /usr/lib/app",
        ),
        (
            # The plan's own link counts as if made already.
            plan(links=(Link("/etc/new", "/usr/share/new"),), files=(File("/etc/new/x", b"x"),)),
            "file /etc/new/x: {} /etc/new/x leads to /usr/share/new/x through /etc/new -> "
            "/usr/share/new",
        ),
        (
            plan(units=(Unit("app.service", "[Service]\n", dropins=(Dropin("a.conf", ""),)),)),
            "unit app.service: {} /etc/systemd/system/app.service.d/a.conf leads to "
            "/usr/lib/app.d/a.conf through /etc/systemd/system/app.service.d -> /usr/lib/app.d",
        ),
    ],
)
def test_a_path_that_leads_outside_the_writable_roots_is_refused(
    linked: Path, broken: Plan, message: str
) -> None:
    (linked / "usr/lib/app/lib.so").write_text("image\n")
    (linked / "usr/lib/app.d").mkdir()
    (linked / "etc/systemd/system/app.service.d").symlink_to("/usr/lib/app.d")
    # Something valid staged first, so that a refusal also proves the rollback.
    whole = Plan(
        source=broken.source,
        format=broken.format,
        directories=broken.directories,
        files=(File("/etc/first", b"first"), *broken.files),
        links=broken.links,
        units=broken.units,
    )
    assert refused(linked, whole) == "test.ign: " + message.format(OUTSIDE)
    assert not (linked / "usr/lib/app/app.conf").exists()
    assert list((linked / "run").iterdir()) == []


def test_links_inside_the_writable_roots_are_followed_there(linked: Path) -> None:
    apply_plan(
        plan(
            directories=(Directory("/var/lib/data"),),
            files=(File("/etc/data/state", b"through a link of the machine"),),
            # A file under a link of the same plan goes where the link will lead. Before, the
            # file made /etc/conf.d a directory: the link was refused as "exists", or with
            # overwrite its rename failed after the file's was committed, leaving both behind.
            links=(Link("/etc/conf.d", "/var/lib/conf"),),
        ),
        linked,
    )
    assert (linked / "var/lib/data/state").read_bytes() == b"through a link of the machine"
    assert os.readlink(linked / "etc/conf.d") == "/var/lib/conf"
    apply_plan(plan(files=(File("/etc/conf.d/a.conf", b"a"),)), linked)
    assert (linked / "var/lib/conf/a.conf").read_bytes() == b"a"
    both = plan(
        links=(Link("/etc/more.d", "../var/lib/more", overwrite=True),),
        files=(File("/etc/more.d/b", b"b"),),
    )
    apply_plan(both, linked)
    assert (linked / "var/lib/more/b").read_bytes() == b"b"
    assert (linked / "etc/more.d/b").read_bytes() == b"b"


def test_a_users_home_elsewhere_gets_no_keys(root: Path) -> None:
    # nobody's home in /etc/passwd is /nonexistent: keys there would go to the read-only image.
    message = refused(root, plan(users=(User("nobody", ("ssh-ed25519 AAAAn n",)),)))
    assert message == (
        "test.ign: user nobody: expected an account whose home is under /etc, /var, /home, /root "
        "to give SSH keys to, but /etc/passwd says its home is '/nonexistent'"
    )
    # Joining a group asks for nothing in the home: it is left alone, not made.
    apply_plan(plan(users=(User("nobody", groups=("sudo",)),)), root)
    assert not (root / "nonexistent").exists()
    assert "sudo:x:27:nobody" in (root / "etc/group").read_text().splitlines()


def test_a_home_that_links_outside_gets_no_keys(root: Path) -> None:
    (root / "usr/lib/roothome").mkdir(parents=True)
    (root / "root/.ssh/authorized_keys").unlink()
    (root / "root/.ssh").rmdir()
    (root / "root").rmdir()
    (root / "root").symlink_to("/usr/lib/roothome")
    message = refused(root, plan(users=(User("root", ("ssh-ed25519 AAAAr r",)),)))
    assert message == (
        f"test.ign: user root's home: {OUTSIDE} /root leads to /usr/lib/roothome through "
        "/root -> /usr/lib/roothome"
    )
    # Fedora CoreOS's layout, /root -> /var/roothome, is inside: the keys go there.
    (root / "root").unlink()
    (root / "root").symlink_to("var/roothome")
    apply_plan(plan(users=(User("root", ("ssh-ed25519 AAAAr r",)),)), root)
    assert (root / "var/roothome/.ssh/authorized_keys").read_text() == "ssh-ed25519 AAAAr r\n"


@pytest.mark.parametrize("key", ["WantedBy", "RequiredBy", "Alias"])
def test_install_section_names_must_be_file_names(root: Path, key: str) -> None:
    unit = Unit("evil.service", f"[Service]\n[Install]\n{key}=../../../usr/lib/x.target\n", True)
    assert refused(root, plan(units=(unit,))) == (
        f"test.ign: unit evil.service: {key}= names '../../../usr/lib/x.target'; expected unit "
        "names (one file name each)"
    )


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (
            b'{"ignition": {"version": "3.4.0"}, "passwd": {"users": [{"name": "core", '
            b'"homeDir": "/usr/local/core"}]}}',
            "passwd.users[0].homeDir: not supported by Berth",
        ),
        (
            b"#cloud-config\nusers:\n  - name: core\n    homedir: /run/core\n",
            "users[0].homedir: not supported by Berth",
        ),
    ],
)
def test_a_home_elsewhere_is_refused_when_the_config_is_read(
    tmp_path: Path, config: bytes, field: str
) -> None:
    # Homes come from the image's defaults (/home/<name>); --check says so before any boot.
    path = tmp_path / "config"
    path.write_bytes(config)
    with pytest.raises(ProvisionError, match=re.escape(field)):
        check(path)
