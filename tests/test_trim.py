"""Trimming the bootstrapped tree, and the package list read from dpkg's status file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from builder.trim import installed_packages, trim_tree

SHADOW = """\
root:$y$j9T$abc$def:19000:0:99999:7:::
daemon:*:19000:0:99999:7:::
nobody:!:19000:0:99999:7:::
locked:!$y$j9T$old$hash:19000:0:99999:7:::
nopass::19000:0:99999:7:::
berth:$6$salt$hash:19000:0:99999:7:::
"""


def touch(tree: Path, rel: str, text: str = "x\n") -> Path:
    path = tree / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for rel in (
        "usr/share/doc/bash/copyright",
        "usr/share/man/man1/bash.1.gz",
        "usr/share/info/dir",
        "usr/share/lintian/overrides/bash",
        "usr/share/bash-completion/completions/apt",
        "etc/apt/sources.list",
        "usr/lib/apt/methods/http",
        "var/lib/apt/lists/lock",
        "var/cache/apt/pkgcache.bin",
        "var/lib/dpkg/status",
        "etc/dpkg/dpkg.cfg",
        "usr/bin/apt",
        "usr/bin/apt-get",
        "usr/bin/dpkg",
        "usr/bin/dpkg-query",
        "usr/lib/x86_64-linux-gnu/libapt-pkg.so.6.0",
        "usr/lib/systemd/system/apt-daily.timer",
        "var/log/dpkg.log",
        "var/log/apt/history.log",
        "var/lib/dbus/machine-id",
        "usr/share/locale/de/LC_MESSAGES/bash.mo",
        "usr/share/locale/fr/LC_MESSAGES/bash.mo",
        "boot/vmlinuz-6.12.0-1-amd64",
        "boot/config-6.12.0-1-amd64",
        "etc/ssh/ssh_host_ed25519_key",
        "etc/ssh/ssh_host_ed25519_key.pub",
        "etc/ssh/ssh_host_rsa_key",
        "etc/shadow-",
        "etc/passwd-",
        "usr/share/python3/debpython/__pycache__/x.pyc",
        "usr/libexec/podman/podman-testing",
        # What must survive.
        "usr/libexec/podman/quadlet",
        "usr/bin/bash",
        "usr/share/locale/locale.alias",
        "usr/lib/x86_64-linux-gnu/libc.so.6",
        "etc/ssh/sshd_config",
        "etc/passwd",
        "var/lib/systemd/keep",
    ):
        touch(root, rel)
    touch(root, "etc/machine-id", "0123456789abcdef0123456789abcdef\n")
    touch(root, "etc/shadow", SHADOW)
    os.symlink("boot/vmlinuz-6.12.0-1-amd64", root / "vmlinuz")
    os.symlink("boot/vmlinuz-6.11.0-1-amd64", root / "vmlinuz.old")  # dangling once /boot goes
    os.symlink("boot/initrd.img-6.12.0-1-amd64", root / "initrd.img")
    generators = root / "usr/lib/systemd/system-generators"
    generators.mkdir(parents=True)
    os.symlink("../../../libexec/podman/quadlet", generators / "podman-system-generator")
    return root


def test_trim_removes_docs_and_package_manager(tree: Path) -> None:
    # A package's log directory (tinyproxy's, its user's and 0750) outlives the bootstrap's logs.
    (tree / "var/log/tinyproxy").mkdir(parents=True)
    os.chmod(tree / "var/log/tinyproxy", 0o750)
    trim_tree(tree)
    assert (tree / "var/log/tinyproxy").stat().st_mode & 0o777 == 0o750
    for rel in (
        "usr/share/doc",
        "usr/share/man",
        "usr/share/info",
        "usr/share/lintian",
        "usr/share/bash-completion",
        "etc/apt",
        "usr/lib/apt",
        "var/lib/apt",
        "var/cache/apt",
        "var/lib/dpkg",
        "etc/dpkg",
        "usr/bin/apt",
        "usr/bin/apt-get",
        "usr/bin/dpkg",
        "usr/bin/dpkg-query",
        "usr/lib/x86_64-linux-gnu/libapt-pkg.so.6.0",
        "usr/lib/systemd/system/apt-daily.timer",
        "var/log/dpkg.log",
        "var/log/apt/history.log",
        "var/lib/dbus/machine-id",
        "usr/share/locale/de",
        "usr/share/locale/fr",
        "etc/shadow-",
        "etc/passwd-",
        "usr/share/python3/debpython/__pycache__",
        "usr/libexec/podman/podman-testing",
    ):
        assert not (tree / rel).exists(), rel
    for rel in (
        "usr/bin/bash",
        "usr/share/locale/locale.alias",
        "usr/lib/x86_64-linux-gnu/libc.so.6",
        "etc/ssh/sshd_config",
        "etc/passwd",
        "var/lib/systemd/keep",
        "usr/share/python3/debpython",
        # Quadlet: the systemd generator that turns /etc/containers/systemd files into units.
        "usr/libexec/podman/quadlet",
        "usr/lib/systemd/system-generators/podman-system-generator",
    ):
        assert (tree / rel).exists(), rel


def test_trim_removes_boot_and_kernel_links(tree: Path) -> None:
    trim_tree(tree)
    assert not (tree / "boot").exists()
    for link in ("vmlinuz", "vmlinuz.old", "initrd.img"):
        assert not (tree / link).is_symlink(), link


def test_host_keys_go_and_machine_id_is_uninitialized(tree: Path) -> None:
    cache = tree.parent / "cached-machine-id"
    os.link(tree / "etc/machine-id", cache)  # the write must not go through a hard link
    trim_tree(tree)
    assert sorted(p.name for p in (tree / "etc/ssh").iterdir()) == ["sshd_config"]
    assert (tree / "etc/machine-id").read_text() == "uninitialized\n"
    assert cache.read_text() == "0123456789abcdef0123456789abcdef\n"


def test_password_fields_are_locked(tree: Path) -> None:
    trim_tree(tree)
    fields = {
        line.split(":")[0]: line.split(":")
        for line in (tree / "etc/shadow").read_text().splitlines()
    }
    assert fields["root"][1] == "!*"
    assert fields["berth"][1] == "!*"
    assert fields["nopass"][1] == "!*"  # an empty field would mean "no password needed"
    assert fields["daemon"][1] == "*"
    assert fields["nobody"][1] == "!"
    assert fields["locked"][1] == "!$y$j9T$old$hash"
    # Everything but the password field is kept as it was.
    assert fields["root"][2:] == ["19000", "0", "99999", "7", "", "", ""]
    assert list(fields) == ["root", "daemon", "nobody", "locked", "nopass", "berth"]
    assert stat.S_IMODE((tree / "etc/shadow").stat().st_mode) == 0o640


def test_trim_is_idempotent(tree: Path) -> None:
    trim_tree(tree)
    shadow = (tree / "etc/shadow").read_text()
    trim_tree(tree)
    assert (tree / "etc/shadow").read_text() == shadow
    assert (tree / "etc/machine-id").read_text() == "uninitialized\n"


STATUS = """\
Package: bash
Status: install ok installed
Priority: required
Architecture: amd64
Version: 5.2.37-2
Description: GNU Bourne Again SHell
 Bash is an sh-compatible command language interpreter.
 Status: install ok installed (a continuation line, not a field)

Package: old-removed
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0-1

Package: half
Status: install reinstreq half-installed
Architecture: amd64
Version: 2.0-1

Package: tzdata
Status: install ok installed
Architecture: all
Version: 2025b-1
Description: time zone and daylight-saving time data

Package: adduser
Status: install ok installed
Architecture: all
Version: 3.137
"""


def test_installed_packages_from_dpkg_status(tmp_path: Path) -> None:
    touch(tmp_path, "var/lib/dpkg/status", STATUS)
    assert installed_packages(tmp_path) == [
        ["adduser", "3.137", "all"],
        ["bash", "5.2.37-2", "amd64"],
        ["tzdata", "2025b-1", "all"],
    ]
