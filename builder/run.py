"""The one way Berth runs external commands and finds host tools.

Every tool is looked up once through `find_tool`, which knows the Debian package that provides it,
so a missing tool is reported as the exact `apt-get install` line instead of a bare ENOENT.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from builder.errors import BuildError, ToolMissing
from builder.log import log

# Host tool -> Debian package. The builder needs nothing on the host beyond these: what goes into
# the image (mkfs.erofs, veritysetup, ukify, depmod, ...) runs from the image's own tree.
HOST_TOOLS: dict[str, str] = {
    "mmdebstrap": "mmdebstrap",
    # bench/bench_delta.py measures casync beside seeded updates, on the same image pairs.
    "casync": "casync",
    # The tests apply sysusers.d files to machine trees with the host's (builder/accounts.py).
    "systemd-sysusers": "systemd",
    "systemd-tmpfiles": "systemd",
    # The tests sign a local package archive to read it as a snapshot (tests/test_archive.py).
    "gpg": "gpg",
    # Asking the archive which versions a build would install (builder/archive.py).
    "apt-get": "apt",
    "apt-cache": "apt",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "mdir": "mtools",
    "mtype": "mtools",
    "qemu-img": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "sfdisk": "fdisk",
    "zstd": "zstd",
    "tar": "tar",
    "gzip": "gzip",
    "nginx": "nginx",
    "etcd": "etcd-server",
    "arch-test": "arch-test",
    "dpkg-deb": "dpkg",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "gcc": "gcc",
    "timeout": "coreutils",
    "veritysetup": "cryptsetup-bin",
    "losetup": "mount",
    # The encryption VM test opens a machine's LUKS2 STATE on the host with its recovery key.
    "cryptsetup": "cryptsetup-bin",
    "debugfs": "e2fsprogs",
    "partx": "util-linux",
    # Preloading container images runs the image's podman in a private mount namespace.
    "unshare": "util-linux",
    "sh": "dash",
    # Secure Boot: the tests sign PE images and write EFI signature lists with the real tools.
    "sbsign": "sbsigntool",
    "sbverify": "sbsigntool",
    "cert-to-efi-sig-list": "efitools",
    "hash-to-efi-sig-list": "efitools",
    "openssl": "openssl",
}

# Files (not commands) the build or the VM harness needs, with their packages.
HOST_FILES: dict[str, str] = {
    "/usr/share/OVMF/OVMF_CODE_4M.fd": "ovmf",
    "/usr/share/keyrings/debian-archive-keyring.gpg": "debian-archive-keyring",
    "/usr/share/OVMF/OVMF_VARS_4M.fd": "ovmf",
    # OVMF built with Secure Boot and SMM (`./build.py run --secure-boot`, the VM tests).
    "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd": "ovmf",
    # Static libc: the tests compile a tiny static program to put in an OCI image.
    "/usr/lib/x86_64-linux-gnu/libc.a": "libc6-dev",
    # A real PE image (systemd-boot) for the signature tests.
    "/usr/lib/systemd/boot/efi/systemd-bootx64.efi": "systemd-boot-efi",
}

DEBUG = bool(os.environ.get("BERTH_DEBUG"))

# What every command `run` starts sees, plus what its caller passes: never the build host's own
# environment, which would make the image depend on the shell it was built from (TZ moves FAT
# timestamps, TAR_OPTIONS, GZIP and ZSTD_CLEVEL change archives, a locale changes the output
# tools are parsed by). Host tools are found with the host's PATH by `find_tool` and run by
# absolute path; this PATH is where they find their own helpers (mmdebstrap its apt and dpkg).
TOOL_ENV: Mapping[str, str] = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TZ": "UTC",
}


@functools.cache
def find_tool(name: str) -> str:
    """Absolute path of a host tool, or ToolMissing naming the package to install."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        package = HOST_TOOLS.get(name, name)
        raise ToolMissing(
            f"required host tool '{name}' was not found",
            hint=f"apt-get install {package}",
        )
    return path


def missing_host_packages(tools: Sequence[str], files: Sequence[str] = ()) -> list[str]:
    """Debian packages that would provide the tools and files not present on this host."""
    packages: list[str] = []
    for tool in tools:
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            packages.append(HOST_TOOLS.get(tool, tool))
    for file in files:
        if not Path(file).exists():
            packages.append(HOST_FILES[file])
    return sorted(set(packages))


def ensure_host_packages(tools: Sequence[str], files: Sequence[str] = ()) -> None:
    """Install what is missing when we are root on Debian; otherwise stop with the exact command."""
    packages = missing_host_packages(tools, files)
    if not packages:
        return
    line = "apt-get install -y " + " ".join(packages)
    if os.geteuid() != 0 or not Path("/etc/debian_version").exists():
        raise ToolMissing(f"missing host packages: {', '.join(packages)}", hint=line)
    log(f"installing host packages: {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdin=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
        check=True,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    find_tool.cache_clear()


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    capture: bool = False,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    quiet: bool = False,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command; raise BuildError with its stderr tail when it fails.

    The first element is resolved with `find_tool` unless it is already a path, so a missing
    tool becomes a clear error. The command's environment is TOOL_ENV and `env`. Output is
    captured when `capture` or `quiet` is set.
    """
    argv = [os.fspath(c) for c in cmd]
    if "/" not in argv[0]:
        argv[0] = find_tool(argv[0])
    if DEBUG:
        log("+ " + shlex.join(argv))
    full_env = {**TOOL_ENV, **(env or {})}
    stdin = None if input is not None else subprocess.DEVNULL
    result = subprocess.run(
        argv,
        input=input,
        stdin=stdin,
        stdout=subprocess.PIPE if capture or quiet else None,
        stderr=subprocess.PIPE if capture or quiet else None,
        env=full_env,
        cwd=cwd,
        check=False,
    )
    if check and result.returncode != 0:
        detail = ""
        if result.stderr:
            tail = result.stderr.decode(errors="replace").strip().splitlines()[-15:]
            detail = "\n" + "\n".join(tail)
        raise BuildError(
            f"command failed with exit status {result.returncode}: {shlex.join(argv)}{detail}"
        )
    return result
