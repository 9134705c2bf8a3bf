"""Stage 1: the root tree from Debian packages (mmdebstrap), trimmed and cached by content hash.

The cache key covers everything that decides the tree: suite, package sources, package list, the
mmdebstrap version, this module's recipe version, and the exact version of every package the
archive would install today (builder/archive.py asks it, in seconds, on every build). A build
whose key matches a cached tree reuses it; when the archive has published anything new for the
image (a security fix), the key differs and the tree is bootstrapped again, saying what changed.
`--offline` reuses the newest cached tree for the same inputs without asking the archive;
`--refresh` bootstraps again whatever the cache holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from builder import archive, trim
from builder.config import ImageConfig
from builder.errors import BuildError
from builder.log import complete_step, log
from builder.run import run
from updater.files import read_utf8
from updater.release.packages import diff_lines

# Bump when the bootstrap or trim recipe changes in a way that changes the cached tree.
RECIPE_VERSION = 3

# Debian's kernel packages insist on an initramfs generator; Berth composes its initrd from the
# tree itself (builder/initrd.py), so a tiny local package satisfies the dependency instead of
# pulling initramfs-tools, busybox and klibc into every image.
_INITRD_STUB_CONTROL = """\
Package: berth-initrd
Version: 1
Architecture: all
Maintainer: Berth <berth@localhost>
Provides: linux-initramfs-tool
Description: marker: Berth composes its initrd from the image tree
"""


DEBIAN_SUITES = frozenset(
    {"buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid", "experimental"}
    | {"oldoldstable", "oldstable", "stable", "testing", "unstable"}
)


@dataclass(frozen=True)
class AptSource:
    uri: str
    suite: str
    components: str = "main"
    options: str = ""  # sources.list options: "check-valid-until=no"

    def line(self) -> str:
        options = f"[{self.options}] " if self.options else ""
        return f"deb {options}{self.uri} {self.suite} {self.components}"


@dataclass(frozen=True)
class RootTree:
    """A cached, trimmed root tree and what was recorded about it before trimming."""

    path: Path  # the tree itself
    kernel: Path  # vmlinuz, moved out of /boot (the kernel lives in the UKI)
    kernel_version: str
    packages: tuple[tuple[str, str, str], ...]  # (name, version, architecture)
    package_files: Path  # directory of <package>.list files (dpkg's file lists)
    var: Path  # the tree's /var, seeded onto the STATE partition
    # (name, version, architecture) -> SHA256 of the .deb, where the archive's index gave it.
    sha256: Mapping[tuple[str, str, str], str] = field(default_factory=dict, compare=False)


def _host_apt_uris(apt: Path = Path("/etc/apt")) -> list[tuple[str, str]]:
    """(uri, suite) pairs from the build host's apt configuration, one-line and deb822 formats.

    Only sources with the `main` component count: Debian's archives have it, third-party
    repositories (which may well name their suite "bookworm" too) usually do not.
    """
    pairs: list[tuple[str, str]] = []
    one_line = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for file in one_line:
        if not file.is_file():
            continue
        for raw in read_utf8(file, BuildError).splitlines():
            words = re.sub(r"\[[^]]*\]", "", raw.split("#", 1)[0]).split()
            if len(words) >= 4 and words[0] == "deb" and "main" in words[3:]:
                pairs.append((words[1], words[2]))
    for file in sorted((apt / "sources.list.d").glob("*.sources")):
        for stanza in read_utf8(file, BuildError).split("\n\n"):
            fields: dict[str, str] = {}
            for raw in stanza.splitlines():
                if raw.startswith("#") or ":" not in raw or raw.startswith((" ", "\t")):
                    continue
                key, value = raw.split(":", 1)
                fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled") == "no":
                continue
            if "main" not in fields.get("components", "").split():
                continue
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    pairs.append((uri, suite))
    return pairs


def snapshot_sources(config: ImageConfig, when: str) -> tuple[AptSource, ...]:
    """The suite, -updates and -security as Debian's snapshot archive had them at `when`.

    Its Release files are long expired by the time a rebuild reads them, and say so: the check
    of their Valid-Until is turned off for these sources (and only these); their signatures are
    still checked."""
    base = config.snapshot_mirror or os.environ.get("BERTH_SNAPSHOT_MIRROR")
    if not base:
        raise BuildError(
            f"snapshot {when}: no address for the snapshot archive",
            hint="set snapshot_mirror in the image definition (Debian's snapshot archive, or "
            "a mirror of it) or BERTH_SNAPSHOT_MIRROR in the environment",
        )
    base = base.rstrip("/")
    old = "check-valid-until=no"
    sources = [AptSource(f"{base}/archive/debian/{when}/", config.suite, options=old)]
    if config.suite not in ("sid", "unstable", "experimental"):
        sources += [
            AptSource(f"{base}/archive/debian/{when}/", f"{config.suite}-updates", options=old),
            AptSource(
                f"{base}/archive/debian-security/{when}/",
                f"{config.suite}-security",
                options=old,
            ),
        ]
    return tuple(sources)


def apt_sources(config: ImageConfig, apt_dir: Path = Path("/etc/apt")) -> tuple[AptSource, ...]:
    """The package sources for an image: a `snapshot` of Debian's archive when one is named,
    else image `mirror`, else $BERTH_MIRROR, else the host's apt.

    Security updates come from the host's security source when it has one.
    """
    if config.snapshot is not None:
        return snapshot_sources(config, config.snapshot)
    suite = config.suite
    mirror = config.mirror or os.environ.get("BERTH_MIRROR")
    security: str | None = os.environ.get("BERTH_SECURITY_MIRROR")
    # Only Debian's own suites: a host may also list third-party repositories.
    host = [(uri, s) for uri, s in _host_apt_uris(apt_dir) if s.split("-")[0] in DEBIAN_SUITES]
    if mirror is None:
        candidates = [uri for uri, s in host if not s.endswith("-security")]
        if not candidates:
            raise BuildError(
                "no Debian package mirror configured",
                hint="set `mirror` in the image definition or BERTH_MIRROR in the environment",
            )
        mirror = candidates[0]
    if security is None:
        security = next((uri for uri, s in host if s.endswith("-security")), None)
    sources = [AptSource(mirror, suite)]
    if suite not in ("sid", "unstable", "experimental"):
        sources.append(AptSource(mirror, f"{suite}-updates"))
        if security is not None:
            sources.append(AptSource(security, f"{suite}-security"))
    return tuple(sources)


def _mmdebstrap_version() -> str:
    out = run(["mmdebstrap", "--version"], capture=True).stdout.decode().strip()
    return out


def cache_key(config: ImageConfig, sources: tuple[AptSource, ...]) -> str:
    material = {
        "recipe": RECIPE_VERSION,
        "suite": config.suite,
        "sources": [s.line() for s in sources],
        "packages": sorted(set(config.packages)),
        "mmdebstrap": _mmdebstrap_version(),
        "stub": _INITRD_STUB_CONTROL,
        "trim": trim.RECIPE,
    }
    blob = json.dumps(material, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def _build_stub_deb(workdir: Path) -> Path:
    pkg = workdir / "berth-initrd"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(_INITRD_STUB_CONTROL)
    deb = workdir / "berth-initrd_1_all.deb"
    run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", pkg, deb],
        quiet=True,
        env={"SOURCE_DATE_EPOCH": "0"},
    )
    return deb


def _load(entry: Path) -> RootTree:
    meta = json.loads((entry / "meta.json").read_text())
    sums = meta.get("resolved", {}).get("sha256", {})
    packages = tuple((p[0], p[1], p[2]) for p in meta["packages"])
    return RootTree(
        path=entry / "tree",
        kernel=entry / "vmlinuz",
        kernel_version=meta["kernel_version"],
        packages=packages,
        package_files=entry / "dpkg-lists",
        var=entry / "var",
        sha256={p: sums["\t".join(p)] for p in packages if "\t".join(p) in sums},
    )


def stub_status() -> str:
    """The dpkg status the bootstrap has when apt resolves: the initrd stub, installed."""
    first, rest = _INITRD_STUB_CONTROL.split("\n", 1)
    return f"{first}\nStatus: install ok installed\n{rest}\n"


def cached_trees(cache_root: Path, key: str) -> list[Path]:
    """The cached trees for these inputs (one per set of archive versions), newest first."""
    found = [e for e in cache_root.glob(f"{key}-*") if (e / "meta.json").is_file()]
    return sorted(found, key=lambda e: (e / "meta.json").stat().st_mtime, reverse=True)


def changed_versions(before: Sequence[Sequence[str]], after: Sequence[Sequence[str]]) -> list[str]:
    """What moved between two package lists: "name old → new", "+name version", "-name"."""
    return diff_lines({p[0]: p[1] for p in before}, {p[0]: p[1] for p in after})


def build_rootfs(
    config: ImageConfig, cache_dir: Path, *, refresh: bool = False, offline: bool = False
) -> RootTree:
    """Return the trimmed root tree for `config`, bootstrapping it only when the archive has
    nothing newer than a cached one (or, `offline`, whenever no tree is cached at all)."""
    sources = apt_sources(config)
    key = cache_key(config, sources)
    cache_root = cache_dir / "rootfs"
    earlier = cached_trees(cache_root, key)
    if offline:
        if not earlier:
            raise BuildError(
                "--offline: no cached root tree for this image's packages and sources",
                hint="build once without --offline, with the package archive reachable",
            )
        log(
            f"root tree cached ({earlier[0].name}); --offline: not asking the archive whether "
            "newer package versions (security fixes) exist"
        )
        return _load(earlier[0])
    with complete_step("Asking the archive which package versions to install"):
        resolution = archive.resolve(
            cache_dir / "apt" / key,
            [s.line() for s in sources],
            [*archive.MINBASE, *config.packages],
            installed=stub_status(),
        )
    entry = cache_root / f"{key}-{resolution.digest()}"
    if (entry / "meta.json").exists() and not refresh:
        log(
            f"root tree cached ({entry.name}): the archive has the same "
            f"{len(resolution.packages)} package versions"
        )
        return _load(entry)
    if earlier and not refresh:
        before = json.loads((earlier[0] / "meta.json").read_text()).get("resolved", {})
        changes = changed_versions(before.get("packages", []), resolution.packages)
        log(f"the archive has changed since the cached tree {earlier[0].name}: bootstrapping again")
        for line in changes[:50]:
            log(f"  {line}")
        if len(changes) > 50:
            log(f"  ... and {len(changes) - 50} more")

    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=entry.parent))
    try:
        with complete_step(
            f"Bootstrapping Debian {config.suite} ({len(config.packages)} packages)"
        ):
            for source in sources:
                log(f"source: {source.line()}")
            deb = _build_stub_deb(staging)
            tree = staging / "tree"
            run(
                [
                    "mmdebstrap",
                    "--variant=minbase",
                    "--mode=root",
                    "--format=directory",
                    '--aptopt=APT::Install-Recommends "false"',
                    "--dpkgopt=path-exclude=/usr/share/doc/*",
                    "--dpkgopt=path-exclude=/usr/share/man/*",
                    "--dpkgopt=path-exclude=/usr/share/info/*",
                    "--dpkgopt=path-exclude=/usr/share/locale/*",
                    "--dpkgopt=path-include=/usr/share/locale/locale.alias",
                    "--dpkgopt=path-exclude=/usr/share/lintian/*",
                    # Installed before apt resolves the package list, so that apt sees
                    # linux-initramfs-tool already provided.
                    f"--essential-hook=copy-in {deb} /tmp",
                    f'--essential-hook=chroot "$1" dpkg -i /tmp/{deb.name}',
                    f'--essential-hook=rm "$1/tmp/{deb.name}"',
                    "--include=" + ",".join(config.packages),
                    config.suite,
                    tree,
                    *[s.line() for s in sources],
                ],
                env={"SOURCE_DATE_EPOCH": "0"},
            )
        with complete_step("Recording packages and trimming the tree"):
            packages = trim.installed_packages(tree)
            (staging / "dpkg-lists").mkdir()
            for lst in (tree / "var/lib/dpkg/info").glob("*.list"):
                shutil.copy2(lst, staging / "dpkg-lists" / lst.name.replace(":amd64", ""))
            kernels = sorted((tree / "boot").glob("vmlinuz-*"))
            if len(kernels) != 1:
                raise BuildError(f"expected exactly one kernel in /boot, found {len(kernels)}")
            kernel_version = kernels[0].name.removeprefix("vmlinuz-")
            shutil.move(kernels[0], staging / "vmlinuz")
            trim.trim_tree(tree)
            # /var is not part of the read-only root: it is STATE's initial content.
            shutil.move(tree / "var", staging / "var")
            (tree / "var").mkdir(mode=0o755)
        meta = {
            "kernel_version": kernel_version,
            "packages": packages,
            "key": entry.name,
            "resolved": resolution.to_json(),
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
        if entry.exists():
            shutil.rmtree(entry)
        staging.rename(entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # Trees for older versions of the same inputs are superseded (and large): --offline uses
    # the newest, and a build that asks the archive never goes back to older versions.
    for old_entry in earlier:
        if old_entry != entry:
            shutil.rmtree(old_entry, ignore_errors=True)
    return _load(entry)
