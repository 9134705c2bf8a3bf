"""The whole build of one image version, stage by stage (see docs/building.md for the flow)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from builder import accounts, disk, elf, formats, initrd, overlay, preload, rootfs, signing, uki
from builder.config import ImageConfig
from builder.disk import stable_uuid
from builder.erofs import make_erofs
from builder.errors import BuildError
from builder.etclist import ETC_LIST, etc_list
from builder.lock import exclusive
from builder.log import complete_step, log, warn
from builder.sbom import spdx_document
from builder.tomlwrite import toml_table
from builder.varfiles import VAR_TMPFILES, var_tmpfiles
from builder.verity import make_verity
from updater import config as agent_config
from updater.release.manifest import Manifest, describe
from updater.release.osrelease import format_os_release
from updater.release.version import Version

ARCH = "x86_64"

# Host tools a build needs (see builder/run.py for their packages).
# apt-get and apt-cache: every build asks the archive which versions it would install.
BUILD_TOOLS = (
    "mmdebstrap",
    "apt-get",
    "apt-cache",
    "mkfs.vfat",
    "mcopy",
    "mmd",
    "qemu-img",
    "zstd",
    "dpkg-deb",
)
BUILD_FILES = ("/usr/share/keyrings/debian-archive-keyring.gpg",)
# Directories the running system mounts over (STATE, the ESP, the initrd's switch-root target).
MOUNT_POINTS = ("/boot", "/root", "/home", "/var", "/sysroot")
# Below /usr/lib/berth/initrd, so the initrd has it too (as /usr/lib/berth/encrypt.conf).
ENCRYPT_CONF = "/usr/lib/berth/initrd/encrypt.conf"


@dataclass(frozen=True)
class BuildResult:
    output: Path
    version: Version
    roothash: str
    seconds: float


def os_release(config: ImageConfig, version: Version) -> str:
    """/usr/lib/os-release, quoted and escaped per os-release(5) (updater.release.osrelease)."""
    fields = {
        "NAME": "Berth",
        "PRETTY_NAME": f"Berth {version} ({config.name})",
        "ID": "berth",
        "ID_LIKE": "debian",
        "VERSION": str(version),
        "VERSION_ID": str(version),
        "IMAGE_ID": config.name,
        "IMAGE_VERSION": str(version),
        "VARIANT_ID": config.name,
        "BERTH_SUITE": config.suite,
        "HOME_URL": "https://github.com/berth-os/berth",
    }
    try:
        return format_os_release(fields)
    except ValueError as e:
        raise BuildError(f"{config.path}: cannot write /usr/lib/os-release: {e}") from None


def trust_anchor(keys_dir: Path) -> bytes:
    """The TUF root metadata to embed; development keys are created (loudly) when none exist."""
    from builder import publish

    root = keys_dir / "root.json"
    if not root.exists():
        publish.init_keys(keys_dir)
        warn("")
        warn(f"NO SIGNING KEYS in {keys_dir}: created DEVELOPMENT keys there.")
        warn("Images built now trust only these keys. For releases, create keys deliberately")
        warn("(./build.py keys init) and keep the root key offline: see docs/updates.md.")
        warn("")
    return root.read_bytes()


def secure_boot_key(keys_dir: Path) -> tuple[Path, Path]:
    """The db key and certificate that sign systemd-boot and the UKI; development Secure Boot
    keys are created (loudly) when the keys directory has none."""
    from builder.publish import secureboot

    directory = secureboot.secureboot_dir(keys_dir)
    if not secureboot.has_secureboot_keys(keys_dir):
        secureboot.init_secureboot_keys(keys_dir)
        warn("")
        warn(f"NO SECURE BOOT KEYS in {directory}: created DEVELOPMENT keys there.")
        warn("systemd-boot and the UKI are signed with them. For releases, create keys")
        warn("deliberately (./build.py keys init) and keep PK and KEK offline: docs/updates.md.")
        warn("")
    secureboot.describe_secureboot_keys(keys_dir)  # private, and what they claim to be
    key = directory / "db.key"
    if not key.exists():
        raise BuildError(
            f"no {key}: the db private key signs every build",
            hint="bring it back from offline storage (PK and KEK may stay offline)",
        )
    return key, directory / "db.crt"


def pcr_signing_key(keys_dir: Path) -> tuple[Path, Path]:
    """The PCR key pair (private, public) that signs each UKI's PCR 11 predictions; a
    development key is created (loudly) when the keys directory has none."""
    from builder.publish import pcrkey

    if not pcrkey.has_pcr_key(keys_dir):
        pcrkey.init_pcr_key(keys_dir)
        warn("")
        warn(f"NO PCR KEY in {pcrkey.pcr_dir(keys_dir)}: created a DEVELOPMENT key there.")
        warn("Machines seal STATE to it: only UKIs signed with it unlock STATE. For releases,")
        warn("create it deliberately (./build.py keys init) and keep it safe: docs/security.md.")
        warn("")
    described = pcrkey.describe_pcr_key(keys_dir)
    assert described is not None
    if described.private is None:
        raise BuildError(
            f"no {pcrkey.pcr_dir(keys_dir) / pcrkey.PRIVATE}: the PCR key signs every UKI",
            hint="bring it back from offline storage; a UKI without its signature never "
            "unlocks STATE",
        )
    return described.private, described.public


def encryption_settings(config: ImageConfig) -> str:
    """/usr/lib/berth/initrd/encrypt.conf: what the initrd does with STATE at first boot
    (sourced by overlays/base/usr/lib/berth/initrd/state-open; read by the agent's status)."""
    pcrs = "7" if config.encrypt_bind_pcr7 else ""
    return (
        "# Written by the build from the image definition's `encrypt` and `encrypt_bind_pcr7`.\n"
        f"ENCRYPT={config.encrypt}\n"
        f"TPM2_PCRS={pcrs}\n"
    )


def esp_enrolment(keys_dir: Path) -> list[Path]:
    """The signed key lists the ESP carries for machines in setup mode (kept in the keys
    directory); none, said loudly, when they are stale or missing and PK or KEK is offline."""
    from builder.publish import secureboot

    directory = secureboot.secureboot_dir(keys_dir)
    found = signing.secureboot_enrolment(keys_dir)
    if found is None:
        warn("")
        warn(f"NO CURRENT ENROLMENT FILES in {directory} (PK.auth, KEK.auth, db.auth) and")
        warn("PK.key or KEK.key is offline: this ESP carries no keys to enrol, so machines in")
        warn("setup mode boot it with Secure Boot off. Bring PK.key and KEK.key back once, and")
        warn("build again (the files are kept): see docs/updates.md.")
        warn("")
        return []
    return [directory / name for name in found]


def update_defaults(config: ImageConfig) -> str:
    """/usr/lib/berth/update.toml: the image's channel and repository; /etc/berth overrides.

    Escaped by a TOML writer, then read back with the agent's own parser: an image never carries
    a file its agent refuses (the error names the image definition and the key).
    """
    text = "# Defaults from the image definition. Override in /etc/berth/update.toml.\n"
    try:
        text += toml_table("update", {"url": config.update.url, "channel": config.update.channel})
        agent_config.parse_defaults(text, "/usr/lib/berth/update.toml")
    except (ValueError, agent_config.ConfigError) as e:
        raise BuildError(
            f"{config.path}: the [update] table makes an update.toml the agent refuses: {e}"
        ) from None
    return text


def _hardlink_copy(source: Path, dest: Path) -> None:
    """A copy of the cached tree whose files share inodes with the cache: fast and small.

    Later stages must replace files, never modify them in place (builder.overlay.replace_file).
    """
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest, symlinks=True, copy_function=os.link)


def _package_list(packages: tuple[tuple[str, str, str], ...]) -> bytes:
    return "".join(f"{name}\t{version}\t{arch}\n" for name, version, arch in packages).encode()


def _make_mount_points(tree: Path) -> None:
    for mountpoint in MOUNT_POINTS:
        path = overlay.host_path(tree, mountpoint, "the image's mount points")
        if path.is_symlink():
            raise BuildError(
                f"{mountpoint} is a mount point of the running system, but the image tree has a "
                f"symbolic link there (to {os.readlink(path)}); expected a directory",
                hint="remove the link from the overlay or extra tree that installs it",
            )
        path.mkdir(exist_ok=True)


def build_image(
    config: ImageConfig,
    version: Version,
    repo: Path,
    *,
    refresh: bool = False,
    offline: bool = False,
    out_dir: Path | None = None,
    keys_dir: Path | None = None,
    extra_trees: Sequence[Path] = (),
) -> BuildResult:
    """Build `config` as `version` into out/<image>/<version>/; point `latest` at it."""
    work = repo / "cache" / "work" / config.name
    # Builds of one image share its work tree: a second build (another shell, a test session,
    # another checkout sharing the cache) waits instead of changing files under the first.
    with exclusive(work.with_name(f"{config.name}.lock"), f"another build of {config.name}"):
        return _build_image(
            config, version, repo, work, (refresh, offline), out_dir, keys_dir, extra_trees
        )


def _build_image(
    config: ImageConfig,
    version: Version,
    repo: Path,
    work: Path,
    freshness: tuple[bool, bool],  # (refresh, offline)
    out_dir: Path | None,
    keys_dir: Path | None,
    extra_trees: Sequence[Path],
) -> BuildResult:
    start = time.monotonic()
    cache = repo / "cache"
    out_root = (out_dir or repo / "out") / config.name
    output = out_root / str(version)
    seed = f"{config.name}:{version}"

    refresh, offline = freshness
    root = rootfs.build_rootfs(config, cache, refresh=refresh, offline=offline)
    work.mkdir(parents=True, exist_ok=True)
    tree = work / "tree"
    with complete_step("Preparing the image tree"):
        _hardlink_copy(root.path, tree)
        release = os_release(config, version)
        overlay.install_file(tree, "/usr/lib/os-release", release.encode())
        variables = {
            "image": config,
            "name": config.name,
            "version": str(version),
            "suite": config.suite,
            "update": config.update,
            "vars": dict(config.variables),
            # Where the preloaded image store is, "" when the image preloads nothing.
            "preload_store": preload.STORE if config.preload else "",
        }
        for name in config.overlays:
            overlay.apply_overlay(repo / "overlays" / name, tree, variables)
        # Site-specific files (certificates, units, a marker) on top, like mkosi's ExtraTrees:
        # no overlay in the repository needed; templates and .modes work as in overlays.
        for extra in extra_trees:
            overlay.apply_overlay(extra, tree, variables)
        overlay.install_agent(repo / "updater", tree)
        # After every overlay: each may declare users and groups (sysusers.d).
        for line in accounts.apply_sysusers(tree).splitlines():
            log(f"accounts: {line}")
        overlay.install_file(tree, accounts.IMAGE_SYSUSERS, accounts.image_sysusers(tree).encode())
        # After the overlays too: their tmpfiles.d lines win over the generated ones.
        overlay.install_file(tree, VAR_TMPFILES, var_tmpfiles(root.var, tree).encode())
        # The only trust anchor for updates, inside the verity-protected /usr. Written through
        # host_path, as everything after the overlays: a link they left must not lead out.
        anchor = trust_anchor(keys_dir or repo / "keys")
        db_key = secure_boot_key(keys_dir or repo / "keys")
        enrolment = esp_enrolment(keys_dir or repo / "keys")
        pcr_key = pcr_signing_key(keys_dir or repo / "keys")
        overlay.install_file(tree, ENCRYPT_CONF, encryption_settings(config).encode())
        overlay.install_file(tree, "/usr/share/berth/tuf/root.json", anchor)
        overlay.install_file(tree, "/usr/lib/berth/update.toml", update_defaults(config).encode())
        overlay.install_file(tree, "/usr/share/berth/packages.txt", _package_list(root.packages))
        _make_mount_points(tree)
        # Last in the tree's preparation: nothing after it writes /etc.
        overlay.install_file(tree, ETC_LIST, etc_list(tree))

    with complete_step("Checking every ELF file (pyelftools)"):
        problems = elf.lint_tree(tree)
        if problems:
            raise BuildError(
                f"ELF lint found {len(problems)} problem(s):\n" + elf.format_problems(problems)
            )

    # After the lint: container images bring their own libraries, resolved in their own roots.
    preloaded: list[preload.PreloadedImage] = []
    if config.preload:
        with complete_step(f"Preloading {len(config.preload)} container image archive(s)"):
            preloaded = preload.preload_images(tree, config.preload, work / "preload")
            log(f"preloaded: {', '.join(i.name for i in preloaded) or 'no named images'}")

    staging = work / "staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    with complete_step("Composing the initrd from the image tree"):
        initrd.compose_initrd(
            tree, root.package_files, root.kernel_version, release, staging / "initrd.zst"
        )
    with complete_step(f"Making the root file system (erofs, {config.compression})"):
        make_erofs(tree, staging / "root.erofs", config.compression, stable_uuid(seed, "erofs"))
    with complete_step("Computing the dm-verity hash tree"):
        roothash = make_verity(
            tree, staging / "root.erofs", staging / "root.verity", config.name, seed
        )
        log(f"root hash: {roothash}")
    with complete_step("Building the UKI"):
        cmdline = uki.kernel_cmdline(roothash, config.cmdline)
        uki.build_uki(
            tree,
            root.kernel,
            root.kernel_version,
            staging / "initrd.zst",
            tree / "usr/lib/os-release",
            cmdline,
            staging / "uki.efi",
            pcr_key,
        )
        # Machines only ever install signed UKIs: the payload's is this one.
        signing.sign_file(staging / "uki.efi", *db_key)
    with complete_step("Assembling the disk image"):
        boot = staging / "systemd-bootx64.efi"
        shutil.copyfile(tree / disk.SYSTEMD_BOOT, boot)
        signing.sign_file(boot, *db_key)
        disk.make_esp(
            boot,
            staging / "uki.efi",
            str(version),
            config.partitions.esp,
            staging / "esp.vfat",
            seed,
            enrolment,
        )
        disk.make_state(tree, root.var, config.partitions.state, staging / "state.ext4", seed)
        layout = disk.berth_layout(
            config,
            str(version),
            roothash,
            staging / "esp.vfat",
            staging / "root.erofs",
            staging / "root.verity",
            staging / "state.ext4",
            seed,
        )
        disk.make_disk(layout, staging / "disk.raw", seed)
        (staging / "esp.vfat").unlink()
        boot.unlink()
        (staging / "state.ext4").unlink()
    disk_size = (staging / "disk.raw").stat().st_size
    appliance = formats.Appliance(config.name, str(version), config.description)
    outputs = formats.write_formats(staging / "disk.raw", config.formats, appliance)
    with complete_step("Writing the manifest and package list"):
        overlay.replace_file(staging / "packages.txt", _package_list(root.packages))
        sbom = spdx_document(config.name, str(version), root.packages, preloaded, root.sha256)
        (staging / "sbom.spdx.json").write_text(sbom)
        (staging / "cmdline.txt").write_text(cmdline + "\n")
        payload = {
            "root.erofs": staging / "root.erofs",
            "root.verity": staging / "root.verity",
            "uki.efi": staging / "uki.efi",
        }
        manifest = Manifest(
            image=config.name,
            version=version,
            arch=ARCH,
            roothash=roothash,
            files=describe(payload),
        )
        (staging / "manifest.json").write_text(manifest.to_json())
        (staging / "disks.json").write_text(formats.describe_outputs(outputs, disk_size))
        (staging / "initrd.zst").unlink()

    # Publish the finished directory in one rename, then move the `latest` link atomically.
    out_root.mkdir(parents=True, exist_ok=True)
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)
    link_tmp = out_root / ".latest.tmp"
    link_tmp.unlink(missing_ok=True)
    link_tmp.symlink_to(str(version))
    os.replace(link_tmp, out_root / "latest")
    shutil.rmtree(tree)
    return BuildResult(output, version, roothash, time.monotonic() - start)
