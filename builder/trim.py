"""Trim the bootstrapped tree: documentation, locales, caches and package-manager state go.

Berth updates only as whole images, so apt and dpkg's database are removed: nothing on a machine
invites an in-place upgrade. The package list survives as /usr/share/berth/packages.txt (written by
the image stage) and beside the build outputs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from builder.run import run
from builder.treetool import tree_command

# Part of the root-tree cache key: edit this text whenever the trim behaviour changes.
RECIPE = (
    "trim-v9: modules netavark podman-testing docs locale apt dpkg caches log-files hostkeys id"
    " boot hostname"
)

# Paths (relative to the tree) removed outright.
_REMOVE = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/lintian",
    "usr/share/bug",
    "usr/share/bash-completion",
    "usr/share/zsh",
    "usr/share/fish",
    "etc/apt",
    "usr/lib/apt",
    "usr/share/apt",
    "var/lib/apt",
    "var/cache/apt",
    "var/cache/debconf",
    "var/cache/ldconfig",
    "var/lib/dpkg",
    "etc/dpkg",
    "usr/share/dpkg",
    "usr/share/debconf",
    "usr/share/perl5/Debconf",
    "etc/cron.daily/apt-compat",
    "etc/cron.daily/dpkg",
    "etc/logrotate.d/apt",
    "etc/logrotate.d/dpkg",
    "usr/lib/systemd/system/apt-daily.service",
    "usr/lib/systemd/system/apt-daily.timer",
    "usr/lib/systemd/system/apt-daily-upgrade.service",
    "usr/lib/systemd/system/apt-daily-upgrade.timer",
    "usr/lib/systemd/system/dpkg-db-backup.service",
    "usr/lib/systemd/system/dpkg-db-backup.timer",
    "etc/systemd/system/timers.target.wants/apt-daily.timer",
    "etc/systemd/system/timers.target.wants/apt-daily-upgrade.timer",
    "etc/systemd/system/timers.target.wants/dpkg-db-backup.timer",
    "var/lib/dbus/machine-id",
    # mmdebstrap copies the build host's name. Without the file a machine takes its name from
    # DHCP or its first-boot config (berth-provision), not from whoever built the image.
    "etc/hostname",
    "var/lib/systemd/random-seed",
    "etc/initramfs-tools",
    # Socket activation is enough for netavark's DHCP proxy; Debian also starts it at boot.
    "etc/systemd/system/default.target.wants/netavark-dhcp-proxy.service",
    # podman's own test-suite helper (36 MB), shipped in the podman package.
    "usr/libexec/podman/podman-testing",
)

# Kernel module directories a container host never needs: sound, cameras and TV cards, GPUs (the
# firmware framebuffer is built in), radios, InfiniBand, industrial I/O. About 45 MB of payload.
_UNNEEDED_MODULES = (
    "sound",
    "drivers/gpu",
    "drivers/media",
    "drivers/staging",
    "drivers/comedi",
    "drivers/iio",
    "drivers/infiniband",
    "drivers/bluetooth",
    "drivers/net/wireless",
    "drivers/net/can",
    "drivers/isdn",
    "drivers/input/joystick",
    "drivers/input/touchscreen",
    "net/bluetooth",
    "net/mac80211",
    "net/wireless",
    "net/can",
)

# Package-manager commands: without their databases they could only do harm.
_REMOVE_COMMANDS = (
    "apt",
    "apt-get",
    "apt-cache",
    "apt-config",
    "apt-mark",
    "apt-cdrom",
    "apt-key",
    "dpkg",
    "dpkg-deb",
    "dpkg-divert",
    "dpkg-query",
    "dpkg-split",
    "dpkg-statoverride",
    "dpkg-trigger",
    "dpkg-maintscript-helper",
    "dpkg-realpath",
)


def installed_packages(tree: Path) -> list[list[str]]:
    """[name, version, architecture] of every installed package, from dpkg's status file."""
    status = (tree / "var/lib/dpkg/status").read_text()
    packages: list[list[str]] = []
    for stanza in status.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            packages.append([fields["Package"], fields["Version"], fields["Architecture"]])
    packages.sort()
    return packages


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def trim_kernel_modules(tree: Path) -> None:
    """Drop unneeded driver families and rebuild the module indexes with the tree's depmod."""
    modules = tree / "usr/lib/modules"
    for moddir in sorted(modules.iterdir()) if modules.is_dir() else []:
        for rel in _UNNEEDED_MODULES:
            _remove(moddir / "kernel" / rel)
        run(
            [
                *tree_command(tree, "/usr/sbin/depmod", argv0="depmod"),
                "-b",
                tree,
                moddir.name,
            ]
        )


def _empty_logs(log_dir: Path) -> None:
    """The bootstrap's log files go (dpkg.log, apt's, alternatives.log: the build's, not a
    machine's); the directories stay, with their modes and owners: packages ship them for
    their services (/var/log/tinyproxy, owned by its user)."""
    for dirpath, _, filenames in os.walk(log_dir):
        for name in filenames:
            (Path(dirpath) / name).unlink()


def trim_tree(tree: Path) -> None:
    for rel in _REMOVE:
        _remove(tree / rel)
    _empty_logs(tree / "var/log")
    for command in _REMOVE_COMMANDS:
        _remove(tree / "usr/bin" / command)
    for lib in (tree / "usr/lib/x86_64-linux-gnu").glob("libapt-*"):
        _remove(lib)
    # Translations: keep only the C locale that glibc has built in.
    for locale_dir in (tree / "usr/share/locale").glob("*"):
        if locale_dir.is_dir():
            shutil.rmtree(locale_dir)
    # The kernel travels inside the UKI; /boot holds nothing the running system needs.
    boot = tree / "boot"
    if boot.exists():
        shutil.rmtree(boot)
    for link in ("vmlinuz", "vmlinuz.old", "initrd.img", "initrd.img.old"):
        _remove(tree / link)
    # Host keys generated during bootstrap would be shared by every machine: each machine makes
    # its own on first boot (berth-ssh-keygen.service).
    for key in (tree / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    # An "uninitialized" machine-id makes the first boot a real first boot (ConditionFirstBoot),
    # and systemd commits the generated id to the persistent /etc overlay.
    machine_id = tree / "etc/machine-id"
    machine_id.unlink(missing_ok=True)
    machine_id.write_text("uninitialized\n")
    # No account may log in with a password: lock every password field.
    shadow = tree / "etc/shadow"
    lines = []
    for line in shadow.read_text().splitlines():
        fields = line.split(":")
        if len(fields) > 1 and not fields[1].startswith(("!", "*")):
            fields[1] = "!*"
        lines.append(":".join(fields))
    shadow.write_text("\n".join(lines) + "\n")
    os.chmod(shadow, 0o640)
    # Stale backups of the account databases carry the same hashes.
    for backup in ("passwd-", "shadow-", "group-", "gshadow-"):
        _remove(tree / "etc" / backup)
    trim_kernel_modules(tree)
    for pycache in (tree / "usr/share/python3").rglob("__pycache__"):
        shutil.rmtree(pycache, ignore_errors=True)
