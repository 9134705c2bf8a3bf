"""The initrd's kernel module closure, on a fake modules directory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from builder.errors import BuildError
from builder.initrd import _DROP, _KEEP, _module_name, module_closure

KVER = "6.12.0-1-amd64"

MODULES_DEP = """\
kernel/fs/erofs/erofs.ko.xz: kernel/lib/libcrc32c.ko.xz kernel/fs/netfs/netfs.ko.xz
kernel/fs/netfs/netfs.ko.xz:
kernel/lib/libcrc32c.ko.xz:
kernel/arch/x86/crypto/crc32c-intel.ko.xz:
kernel/crypto/crc32c_generic.ko.xz:
kernel/fs/ext4/ext4.ko.xz: kernel/fs/mbcache.ko.xz kernel/fs/jbd2/jbd2.ko.xz
kernel/fs/mbcache.ko.xz:
kernel/fs/jbd2/jbd2.ko.xz:
kernel/drivers/md/dm-verity.ko.xz: kernel/drivers/md/dm-bufio.ko.xz
kernel/drivers/md/dm-bufio.ko.xz:
kernel/drivers/block/virtio_blk.ko.xz:
kernel/drivers/usb/storage/uas.ko.xz: kernel/drivers/usb/storage/usb-storage.ko.xz
kernel/drivers/usb/storage/usb-storage.ko.xz:
kernel/drivers/unrelated.ko.xz:
kernel/drivers/pre_a.ko.xz:
kernel/drivers/pre_b.ko.xz:
kernel/drivers/post_only.ko.xz:
kernel/drivers/multi.ko.xz:
"""

MODULES_SOFTDEP = """\
# Soft dependencies extracted from modules themselves.
softdep libcrc32c pre: crc32c
softdep ext4 pre: crc32c
softdep dm_verity pre: dm-mod
softdep multi post: post_only pre: pre_a
softdep multi pre: pre_b
"""

MODULES_ALIAS = """\
# Aliases extracted from modules themselves.
alias crypto-crc32c crc32c_intel
alias crc32c crc32c_intel
alias crypto-crc32c crc32c_generic
alias crc32c crc32c_generic
alias pci:v00001AF4d00001001sv*sd*bc*sc*i* virtio_blk
alias fs-erofs erofs
"""

MODULES_BUILTIN = """\
kernel/drivers/md/dm-mod.ko
kernel/drivers/virtio/virtio_pci.ko

kernel/drivers/virtio/virtio.ko
"""


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    moddir = tmp_path / "usr/lib/modules" / KVER
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_text(MODULES_DEP)
    (moddir / "modules.softdep").write_text(MODULES_SOFTDEP)
    (moddir / "modules.alias").write_text(MODULES_ALIAS)
    (moddir / "modules.builtin").write_text(MODULES_BUILTIN)
    return tmp_path


def test_module_name() -> None:
    assert _module_name("kernel/drivers/md/dm-verity.ko.xz") == "dm_verity"
    assert _module_name("kernel/crypto/crc32c_generic.ko.zst") == "crc32c_generic"
    assert _module_name("kernel/fs/ext4/ext4.ko.gz") == "ext4"
    assert _module_name("kernel/fs/ext4/ext4.ko") == "ext4"


def test_hard_dependencies_come_along(tree: Path) -> None:
    assert module_closure(tree, KVER, ["uas"]) == [
        "kernel/drivers/usb/storage/uas.ko.xz",
        "kernel/drivers/usb/storage/usb-storage.ko.xz",
    ]


def test_softdep_alias_resolves_to_every_module_providing_it(tree: Path) -> None:
    # erofs -> libcrc32c (hard) -> "crc32c" (soft, an alias of two modules).
    assert module_closure(tree, KVER, ["erofs"]) == [
        "kernel/arch/x86/crypto/crc32c-intel.ko.xz",
        "kernel/crypto/crc32c_generic.ko.xz",
        "kernel/fs/erofs/erofs.ko.xz",
        "kernel/fs/netfs/netfs.ko.xz",
        "kernel/lib/libcrc32c.ko.xz",
    ]


def test_builtin_dependency_is_skipped(tree: Path) -> None:
    # dm_verity's pre-softdep dm-mod is built in: nothing to carry, and no error.
    assert module_closure(tree, KVER, ["dm-verity"]) == [
        "kernel/drivers/md/dm-bufio.ko.xz",
        "kernel/drivers/md/dm-verity.ko.xz",
    ]
    assert module_closure(tree, KVER, ["virtio_pci", "dm_mod", "virtio"]) == []


def test_all_pre_softdeps_in_any_order_and_over_several_lines(tree: Path) -> None:
    # depmod writes one line per MODULE_SOFTDEP; post: dependencies are not needed up front.
    assert module_closure(tree, KVER, ["multi"]) == [
        "kernel/drivers/multi.ko.xz",
        "kernel/drivers/pre_a.ko.xz",
        "kernel/drivers/pre_b.ko.xz",
    ]


def test_closure_is_deduplicated_and_sorted(tree: Path) -> None:
    both = module_closure(tree, KVER, ["ext4", "erofs", "virtio_blk", "ext4"])
    assert both == sorted(set(both))
    assert "kernel/fs/jbd2/jbd2.ko.xz" in both
    assert "kernel/fs/mbcache.ko.xz" in both
    assert "kernel/drivers/block/virtio_blk.ko.xz" in both
    assert "kernel/crypto/crc32c_generic.ko.xz" in both
    assert "kernel/drivers/unrelated.ko.xz" not in both
    assert both.count("kernel/lib/libcrc32c.ko.xz") == 1
    # ext4 soft-depends on the crc32c algorithm, not on libcrc32c.
    assert module_closure(tree, KVER, ["ext4"]) == [
        "kernel/arch/x86/crypto/crc32c-intel.ko.xz",
        "kernel/crypto/crc32c_generic.ko.xz",
        "kernel/fs/ext4/ext4.ko.xz",
        "kernel/fs/jbd2/jbd2.ko.xz",
        "kernel/fs/mbcache.ko.xz",
    ]


def test_missing_module_is_an_error(tree: Path) -> None:
    with pytest.raises(
        BuildError, match=f"kernel module no_such_mod is neither built in nor in {re.escape(KVER)}"
    ):
        module_closure(tree, KVER, ["virtio_blk", "no-such-mod"])


def test_missing_dependency_of_a_module_is_an_error(tree: Path) -> None:
    dep = tree / "usr/lib/modules" / KVER / "modules.dep"
    dep.write_text(dep.read_text() + "kernel/drivers/needy.ko.xz: kernel/drivers/gone.ko.xz\n")
    with pytest.raises(BuildError, match="kernel module gone is neither built in"):
        module_closure(tree, KVER, ["needy"])


def test_softdep_and_alias_files_are_optional(tree: Path) -> None:
    moddir = tree / "usr/lib/modules" / KVER
    (moddir / "modules.softdep").unlink()
    (moddir / "modules.alias").unlink()
    assert module_closure(tree, KVER, ["erofs"]) == [
        "kernel/fs/erofs/erofs.ko.xz",
        "kernel/fs/netfs/netfs.ko.xz",
        "kernel/lib/libcrc32c.ko.xz",
    ]


@pytest.mark.parametrize(
    ("path", "kept"),
    [
        ("/usr/lib/systemd/system/systemd-udevd.service", True),
        ("/usr/lib/systemd/system-generators/systemd-fstab-generator", True),
        ("/usr/lib/systemd/systemd-journald", True),
        ("/usr/lib/udev/rules.d/60-block.rules", True),
        ("/usr/lib/udev/hwdb.bin", False),
        ("/usr/lib/udev/hwdb.d/20-pci-vendor-model.hwdb", False),
        ("/usr/lib/systemd/user/default.target", False),
        ("/usr/bin/systemctl", True),
        ("/usr/bin/systemd-analyze", False),
        ("/usr/sbin/modprobe", True),
        ("/usr/share/man/man1/systemctl.1.gz", False),
    ],
)
def test_package_file_filter(path: str, kept: bool) -> None:
    assert bool(_KEEP.search(path) and not _DROP.search(path)) == kept
