"""What a later release adds to /var reaches machines: the image's /var as tmpfiles.d lines,
applied by the real systemd-tmpfiles to a machine's older /var."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from builder.run import find_tool
from builder.varfiles import var_tmpfiles


def create(conf: str, machine: Path, work: Path) -> None:
    """What a machine's boot does with the lines: the real systemd-tmpfiles --create."""
    (work / "berth-var.conf").write_text(conf)
    subprocess.run(
        [
            find_tool("systemd-tmpfiles"),
            f"--root={machine}",
            "--create",
            str(work / "berth-var.conf"),
        ],
        check=True,
        capture_output=True,
    )


def test_new_directories_are_made_and_the_machines_own_are_left_alone(tmp_path: Path) -> None:
    # The new release's /var: a package's log directory (setgid, owned by its user) and a link.
    var = tmp_path / "image-var"
    (var / "log/tinyproxy").mkdir(parents=True)
    os.chmod(var / "log/tinyproxy", 0o2750)
    os.chown(var / "log/tinyproxy", 4242, 4)
    (var / "lib/app").mkdir(parents=True)
    (var / "run").symlink_to("/run")
    (var / "tmp").mkdir()
    (var / "log/ignored-file").write_text("files are STATE's own")
    tree = tmp_path / "tree"
    (tree / "usr/lib/tmpfiles.d").mkdir(parents=True)
    (tree / "usr/lib/tmpfiles.d/tmp.conf").write_text("q /var/tmp 1777 root root 30d\n")
    conf = var_tmpfiles(var, tree)
    assert "d /var/log/tinyproxy :2750 :4242 :4 -" in conf
    assert "L /var/run - - - - /run" in conf
    assert "/var/tmp" not in conf and "ignored-file" not in conf  # tmp.conf has /var/tmp

    # A machine's /var from the release before: /var/lib/app is there, with the operator's mode.
    machine = tmp_path / "machine"
    (machine / "var/lib/app").mkdir(parents=True)
    os.chmod(machine / "var/lib/app", 0o700)
    create(conf, machine, tmp_path)
    made = (machine / "var/log/tinyproxy").stat()
    assert (made.st_mode & 0o7777, made.st_uid, made.st_gid) == (0o2750, 4242, 4)
    assert (machine / "var/lib/app").stat().st_mode & 0o777 == 0o700
    assert os.readlink(machine / "var/run") == "/run"


def test_owners_follow_the_name_not_the_image_id(tmp_path: Path) -> None:
    """A package's system user got id 100 in the new release's build but 101 on the machine
    (whose own /etc/passwd already gave 100 to another user): its directory goes to 101."""
    var = tmp_path / "image-var"
    (var / "log/tinyproxy").mkdir(parents=True)
    os.chown(var / "log/tinyproxy", 100, 4)
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/passwd").write_text(
        "root:x:0:0::/root:/bin/sh\ntinyproxy:x:100:65534::/:/bin/false\n"
    )
    (tree / "etc/group").write_text("root:x:0:\nadm:x:4:\n")
    conf = var_tmpfiles(var, tree)
    assert "d /var/log/tinyproxy :0755 :tinyproxy :adm -" in conf
    machine = tmp_path / "machine"
    (machine / "etc").mkdir(parents=True)
    (machine / "etc/passwd").write_text(
        "root:x:0:0::/root:/bin/sh\ntss:x:100:102::/:/bin/false\ntinyproxy:x:101:65534::/:/bin/false\n"
    )
    (machine / "etc/group").write_text("root:x:0:\nadm:x:4:\ntss:x:102:\n")
    create(conf, machine, tmp_path)
    made = (machine / "var/log/tinyproxy").stat()
    assert (made.st_uid, made.st_gid) == (101, 4)


def test_odd_names_are_escaped(tmp_path: Path) -> None:
    (tmp_path / "var/lib/with space").mkdir(parents=True)
    (tmp_path / "tree").mkdir()
    assert "d /var/lib/with\\x20space :0755" in var_tmpfiles(tmp_path / "var", tmp_path / "tree")
