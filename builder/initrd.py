"""Stage 4: the initrd, composed from the image's own tree.

Not a generic initrd generator: Berth's boot path is known, so the initrd carries exactly what it
needs — systemd in initrd mode, udev, kmod, veritysetup, fsck and the storage drivers for the
platforms Berth ships on — plus Berth's own initrd units from /usr/lib/berth/initrd in the tree.
Binaries' libraries come from the same pyelftools resolver as the ELF lint (the way dracut-install
works), kernel modules from the tree's modules.dep closure. Same inputs give the same bytes.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from builder.cpio import Entry, write_cpio
from builder.elf import Resolver, tree_path
from builder.errors import BuildError
from builder.log import log
from builder.run import run
from builder.treetool import tree_command

# Packages whose systemd/udev payload the initrd takes (filtered by _KEEP below).
PACKAGES = ("systemd", "udev", "systemd-cryptsetup", "dmsetup", "kmod")

# Only these parts of those packages: units, generators, helpers, udev rules and their programs.
_KEEP = re.compile(
    r"^/usr/lib/(systemd/(system|system-generators|systemd[^/]*$|system\.conf\.d)"
    r"|udev/(rules\.d/|[^/]+$)|modprobe\.d/|sysctl\.d/|tmpfiles\.d/)"
    r"|^/usr/bin/(systemctl|journalctl|udevadm|systemd-tmpfiles|systemd-escape|kmod"
    r"|systemd-ask-password|systemd-tty-ask-password-agent|systemd-creds|systemd-cryptenroll)$"
    r"|^/usr/sbin/(dmsetup|modprobe|insmod|rmmod|lsmod|depmod|modinfo)$"
)
# ...minus what an initrd never uses.
_DROP = re.compile(
    r"(/hwdb\.d/|/hwdb\.bin$|/user[^/]*/|\.conf\.d/.+\.conf$"
    # Daemons of the real system that no initrd unit starts.
    r"|/systemd-(networkd|networkd-wait-online|network-generator|logind|hostnamed|localed"
    r"|timedated|storagetm|bsod|backlight|rfkill|user-sessions|socket-proxyd|ssh-proxy"
    r"|pcrlock|measure|xdg-autostart-condition)$)"
)

# Further programs used by the initrd units and for rescue from the emergency shell.
EXTRA_FILES = (
    "/usr/bin/bash",
    "/usr/bin/sh",
    "/usr/bin/mount",
    "/usr/bin/umount",
    "/usr/sbin/sulogin",
    "/usr/sbin/fsck",
    "/usr/sbin/fsck.ext4",
    "/usr/sbin/e2fsck",
    "/usr/sbin/blkid",
    "/usr/sbin/sfdisk",
    "/usr/bin/partx",
    "/usr/sbin/veritysetup",
    # STATE: made a LUKS2 volume at first boot (mke2fs inside it, the image's /var copied back),
    # opened with its TPM2 token on every boot (overlays/base/usr/lib/berth/initrd/state-open).
    "/usr/sbin/cryptsetup",
    "/usr/sbin/mke2fs",
    "/usr/sbin/mkfs.ext4",
    "/usr/sbin/dumpe2fs",
    "/etc/mke2fs.conf",
    "/usr/bin/cp",
    "/usr/bin/dd",
    "/usr/bin/base64",
    "/usr/bin/chattr",
    "/usr/bin/grep",
    "/usr/bin/tr",
    "/usr/bin/head",
    "/usr/bin/mv",
    "/usr/lib/udev/rules.d/61-berth-state.rules",
    # libcryptsetup's handler for systemd's TPM2 token, which systemd-cryptsetup unlocks through.
    "/usr/lib/x86_64-linux-gnu/cryptsetup/libcryptsetup-token-systemd-tpm2.so",
    # systemd loads the TPM's TCTI by name (not a .note.dlopen feature).
    "/usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0",
    "/usr/bin/mkdir",
    "/usr/bin/rm",
    "/usr/bin/sleep",
    "/usr/bin/cat",
    "/usr/bin/ls",
    "/usr/bin/ln",
    "/usr/bin/readlink",
    "/usr/bin/basename",
    "/usr/bin/dirname",
    "/usr/bin/lsblk",
    "/usr/bin/dmesg",
    "/etc/passwd",
    "/etc/group",
    "/etc/shadow",
    "/etc/gshadow",
)

# Libraries that systemd and kmod load with dlopen() (named by their FDO .note.dlopen features).
DLOPEN_FEATURES = ("cryptsetup", "kmod", "zstd", "lzma", "lz4", "tpm")

# Kernel modules by name; their modules.dep closure and pre-softdeps come along.
MODULES = (
    # virtual machines
    "virtio_blk",
    "virtio_scsi",
    "virtio_pci",
    "virtio_mmio",
    "virtio_console",
    "xen_blkfront",
    "hv_storvsc",
    "hv_vmbus",
    "vmw_pvscsi",
    # bare metal and emulated disks
    "nvme",
    "ahci",
    "ata_piix",
    "sd_mod",
    "sr_mod",
    "mpt3sas",
    "megaraid_sas",
    "usb_storage",
    "uas",
    "xhci_pci",
    "ehci_pci",
    "mmc_block",
    "sdhci_pci",
    # what the boot path mounts
    "erofs",
    "dm_verity",
    "dm_mod",
    # an encrypted STATE: LUKS2's aes-xts-plain64, and the kernel crypto API cryptsetup checks
    "dm_crypt",
    "xts",
    "aesni_intel",
    "algif_skcipher",
    "overlay",
    "ext4",
    "vfat",
    "nls_cp437",
    "nls_iso8859_1",
    "efivarfs",
    "autofs4",
)

PRELOAD = ("erofs", "dm_verity", "overlay", "ext4")

# Units of the systemd package that make no sense in the initrd (their programs are not there).
MASKED = (
    "ldconfig.service",
    "systemd-hwdb-update.service",
    "systemd-journal-catalog-update.service",
)

BERTH_INITRD_DIR = "/usr/lib/berth/initrd"


def _package_files(lists: Path, package: str) -> list[str]:
    listing = lists / f"{package}.list"
    if not listing.exists():
        raise BuildError(f"initrd: package {package} is not installed in the image")
    return [line for line in listing.read_text().splitlines() if line and line != "/."]


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", base).replace("-", "_")


def module_closure(tree: Path, kver: str, wanted: Iterable[str]) -> list[str]:
    """Relative module paths (as in modules.dep) for `wanted` and everything they depend on."""
    moddir = tree / "usr/lib/modules" / kver
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[_module_name(path)] = path
    softdeps: dict[str, list[str]] = {}
    softdep_file = moddir / "modules.softdep"
    if softdep_file.exists():
        for line in softdep_file.read_text().splitlines():
            # "softdep NAME pre: A B post: C": the sections may come in any order, and depmod
            # writes one line per MODULE_SOFTDEP, so a module can have several lines.
            words = line.split()
            if len(words) > 2 and words[0] == "softdep":
                pre = softdeps.setdefault(words[1].replace("-", "_"), [])
                section: str | None = None
                for word in words[2:]:
                    if word in ("pre:", "post:"):
                        section = word
                    elif section == "pre:":
                        pre.append(word)
    builtin = {
        _module_name(line)
        for line in (moddir / "modules.builtin").read_text().splitlines()
        if line.strip()
    }
    # Soft dependencies often name an alias ("crc32c"), not a module: resolve those too, or
    # e.g. libcrc32c (needed by erofs and ext4) fails to initialise without its algorithm.
    aliases: dict[str, list[str]] = {}
    alias_file = moddir / "modules.alias"
    if alias_file.exists():
        for line in alias_file.read_text().splitlines():
            words = line.split()
            if len(words) == 3 and words[0] == "alias" and "*" not in words[1]:
                aliases.setdefault(words[1].replace("-", "_"), []).append(words[2])
    result: set[str] = set()
    queue = [w.replace("-", "_") for w in wanted]
    while queue:
        name = queue.pop()
        if name in builtin:
            continue
        if name not in by_name:
            raise BuildError(f"initrd: kernel module {name} is neither built in nor in {kver}")
        path = by_name[name]
        if path in result:
            continue
        result.add(path)
        queue.extend(_module_name(d) for d in deps[path])
        for soft in softdeps.get(name, []):
            soft = soft.replace("-", "_")
            if soft in by_name or soft in builtin:
                queue.append(soft)
            else:
                queue.extend(m.replace("-", "_") for m in aliases.get(soft, []))
    return sorted(result)


class _Builder:
    def __init__(self, tree: Path) -> None:
        self.tree = tree
        self.entries: dict[str, Entry] = {}

    def add_dirs(self, path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.entries:
                source = self.tree / d
                if source.is_symlink():
                    self.add_from_tree("/" + d)
                else:
                    self.entries[d] = Entry(d, stat.S_IFDIR | 0o755)

    def add(self, entry: Entry) -> None:
        self.add_dirs("/" + entry.path)
        self.entries[entry.path] = entry

    def add_from_tree(self, path: str, dest: str | None = None) -> None:
        """Copy one file, symlink or directory node from the tree (symlinks stay symlinks)."""
        source = self.tree / path.lstrip("/")
        rel = (dest or path).strip("/")
        if rel in self.entries:
            return
        st = source.lstat()
        if stat.S_ISLNK(st.st_mode):
            self.add(Entry(rel, stat.S_IFLNK | 0o777, os.readlink(source).encode()))
            # The target must be there too, wherever it points inside the tree.
            target = tree_path(self.tree, path)
            if target.exists():
                self.add_from_tree("/" + str(target.relative_to(self.tree)))
        elif stat.S_ISDIR(st.st_mode):
            self.add(Entry(rel, stat.S_IFDIR | stat.S_IMODE(st.st_mode)))
        elif stat.S_ISREG(st.st_mode):
            self.add(Entry(rel, stat.S_IFREG | stat.S_IMODE(st.st_mode), source.read_bytes(), 0, 0))


def compose_initrd(
    tree: Path,
    package_lists: Path,
    kernel_version: str,
    os_release: str,
    output: Path,
) -> None:
    """Write the zstd-compressed initrd for `tree` to `output`."""
    b = _Builder(tree)
    files: set[str] = set(EXTRA_FILES)
    for package in PACKAGES:
        for path in _package_files(package_lists, package):
            if _KEEP.search(path) and not _DROP.search(path):
                source = tree / path.lstrip("/")
                if source.is_symlink() or source.is_file():
                    files.add(path)
    berth = tree / BERTH_INITRD_DIR.lstrip("/")
    if not berth.is_dir():
        raise BuildError(
            f"initrd: the image has no {BERTH_INITRD_DIR} (is overlay 'base' applied?)"
        )

    resolver = Resolver(tree)
    elves = [p for p in files if (tree / p.lstrip("/")).is_file() and resolver.elf_info(p)]
    files.update(resolver.closure(elves, DLOPEN_FEATURES))
    for path in sorted(files):
        b.add_from_tree(path)

    # Berth's initrd units and helpers: units are enabled by the [Install] WantedBy= they name.
    for source in sorted(berth.rglob("*")):
        rel = str(source.relative_to(berth))
        if source.is_dir():
            continue
        if rel.startswith("units/") and source.parent.name.endswith(".d"):
            # A drop-in for a unit the initrd already has (units/<unit>.d/<name>.conf).
            dropin = f"usr/lib/systemd/system/{source.parent.name}/{source.name}"
            b.add(Entry(dropin, stat.S_IFREG | 0o644, source.read_bytes()))
        elif rel.startswith("units/"):
            name = source.name
            b.add(
                Entry(f"usr/lib/systemd/system/{name}", stat.S_IFREG | 0o644, source.read_bytes())
            )
            for target in re.findall(r"^WantedBy=(.+)$", source.read_text(), re.M):
                for t in target.split():
                    link = f"usr/lib/systemd/system/{t}.wants/{name}"
                    b.add(Entry(link, stat.S_IFLNK | 0o777, f"../{name}".encode()))
        else:
            mode = stat.S_IMODE(source.stat().st_mode)
            b.add(Entry(f"usr/lib/berth/{rel}", stat.S_IFREG | mode, source.read_bytes()))

    # Kernel modules, with indexes regenerated by the tree's own depmod for just this subset.
    moddir = f"usr/lib/modules/{kernel_version}"
    modules = module_closure(tree, kernel_version, MODULES)
    for rel in modules:
        b.add_from_tree(f"/{moddir}/{rel}")
    for meta in ("modules.order", "modules.builtin", "modules.builtin.modinfo", "modules.softdep"):
        if (tree / moddir / meta).exists():
            b.add_from_tree(f"/{moddir}/{meta}")
    with tempfile.TemporaryDirectory(prefix="berth-depmod-") as tmp:
        staging = Path(tmp)
        for rel in [*modules, "modules.order", "modules.builtin", "modules.builtin.modinfo"]:
            src = tree / moddir / rel
            if src.exists():
                dst = staging / "lib/modules" / kernel_version / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(
                    src, dst
                ) if src.stat().st_dev == staging.stat().st_dev else dst.write_bytes(
                    src.read_bytes()
                )
        (staging / "etc/depmod.d").mkdir(parents=True)
        run(
            [
                *tree_command(tree, "/usr/sbin/depmod", argv0="depmod"),
                "-b",
                staging,
                "-C",
                staging / "etc/depmod.d",
                kernel_version,
            ]
        )
        # depmod looks below <base>/lib/modules; in the initrd /lib is a link to usr/lib.
        for index in sorted((staging / "lib/modules" / kernel_version).glob("modules.*")):
            b.add(Entry(f"{moddir}/{index.name}", stat.S_IFREG | 0o644, index.read_bytes()))

    # initrd-release marks this as an initrd for systemd; /init is systemd itself.
    b.add(Entry("etc/initrd-release", stat.S_IFREG | 0o644, os_release.encode()))
    b.add(Entry("etc/os-release", stat.S_IFLNK | 0o777, b"initrd-release"))
    b.add(Entry("etc/machine-id", stat.S_IFREG | 0o444, b""))
    b.add(Entry("etc/fstab", stat.S_IFREG | 0o644, b""))
    # Loaded up front rather than on demand: the kernel's request_module() for a file system
    # type is not guaranteed to reach modprobe this early, and these are needed on every boot.
    preload = "".join(f"{m}\n" for m in PRELOAD)
    b.add(Entry("etc/modules-load.d/berth.conf", stat.S_IFREG | 0o644, preload.encode()))
    for unit in MASKED:
        b.add(Entry(f"etc/systemd/system/{unit}", stat.S_IFLNK | 0o777, b"/dev/null"))
    b.add(Entry("init", stat.S_IFLNK | 0o777, b"usr/lib/systemd/systemd"))
    for top in ("bin", "sbin", "lib", "lib64"):
        if (tree / top).is_symlink():
            b.add_from_tree("/" + top)
    for d in ("dev", "proc", "sys", "run", "tmp", "sysroot", "root", "var", "etc", "usr/lib/berth"):
        b.add(Entry(d, stat.S_IFDIR | (0o1777 if d == "tmp" else 0o755)))

    with tempfile.NamedTemporaryFile(dir=output.parent, prefix=".initrd-", suffix=".cpio") as raw:
        write_cpio(raw, list(b.entries.values()))
        raw.flush()
        size = raw.tell()
        run(["zstd", "-q", "-f", "-9", "-T0", raw.name, "-o", output])
    log(
        f"initrd: {len(b.entries)} entries, {len(modules)} kernel modules, "
        f"{size / 1e6:.1f} MB → {output.stat().st_size / 1e6:.1f} MB zstd"
    )
