"""What the archive would install now: the exact versions behind an image's package set.

Before a build reuses a cached root tree it asks the archive (the suite, `-updates` and
`-security`) which version of every package the bootstrap would install today, so that a fix
published since the tree was made reaches the next build instead of waiting for `--refresh`. The
question is asked with the host's apt-get in an apt directory of the build's own (sources, lists,
an empty dpkg status but for Berth's initrd stub), never the host's package state, and costs a
few seconds: an `update` of the indexes (kept between builds, so mostly "Hit") and a simulated
install of what mmdebstrap's minbase installs (`?essential`, apt) plus the image's packages.

The answer, a `Resolution`, names every package with its version and architecture, and the
SHA256 the archive gives for its .deb (for the SBOM). Its digest is part of the tree's cache key.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from builder.errors import BuildError
from builder.run import run

# An `apt-get install --simulate` line: "Inst libc6 (2.41-12 Debian:13.1/stable [amd64])", or
# "Inst name [old] (new ...)" when something is installed already.
_INST = re.compile(r"^Inst (?P<name>\S+) (?:\[\S+\] )?\((?P<version>\S+) .*\[(?P<arch>[^]]+)\]\)")
# What apt prints for an index it could not fetch (with --error-on=any it also fails).
_FAILED = re.compile(r"^(?:E|W): Failed to fetch (?P<uri>\S+)\s+(?P<why>.*)$", re.MULTILINE)
# mmdebstrap's minbase: every Essential:yes package and apt, whatever the image lists.
MINBASE = ("?essential", "apt")


@dataclass(frozen=True)
class Resolution:
    """The packages a bootstrap would install, as (name, version, architecture), sorted."""

    packages: tuple[tuple[str, str, str], ...]
    # (name, version, architecture) -> the SHA256 of its .deb, as the archive's index gives it.
    sha256: Mapping[tuple[str, str, str], str] = field(default_factory=dict, compare=False)

    def digest(self) -> str:
        """A short digest of the exact versions: part of the tree's cache key."""
        blob = json.dumps([list(p) for p in self.packages]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_json(self) -> dict[str, object]:
        return {
            "packages": [list(p) for p in self.packages],
            "sha256": {"\t".join(k): v for k, v in sorted(self.sha256.items())},
        }


class ArchiveUnreachable(BuildError):
    """The archive could not be asked; --offline builds from the cache without asking."""


def _apt_options(apt_dir: Path, arch: str) -> list[str]:
    options = {
        # Indexes, caches and the (empty) dpkg status are the build's own ...
        "Dir::State": apt_dir / "state",
        "Dir::State::status": apt_dir / "status",
        "Dir::Cache": apt_dir / "cache",
        "Dir::Etc::SourceList": apt_dir / "sources.list",
        "Dir::Etc::SourceParts": apt_dir / "empty",
        # ... and so is the policy: the host's pins must not change what the image gets. The
        # host's apt.conf (proxies) and trusted keys still apply, as they do for mmdebstrap.
        "Dir::Etc::Preferences": apt_dir / "empty" / "none",
        "Dir::Etc::PreferencesParts": apt_dir / "empty",
        "APT::Architecture": arch,
        "APT::Architectures::": arch,
        "APT::Install-Recommends": "false",
        "Debug::NoLocking": "1",
        "Acquire::Languages": "none",
    }
    return [f"-o{key}={value}" for key, value in options.items()]


def _prepare(apt_dir: Path, source_lines: Sequence[str], installed: str) -> None:
    for sub in ("state/lists/partial", "cache/archives/partial", "empty"):
        (apt_dir / sub).mkdir(parents=True, exist_ok=True)
    (apt_dir / "sources.list").write_text("".join(line + "\n" for line in source_lines))
    (apt_dir / "status").write_text(installed)
    # No binary caches: they would be rebuilt on every run anyway, and go stale between them.
    for cache in (apt_dir / "cache").glob("*.bin"):
        cache.unlink()


def resolve(
    apt_dir: Path,
    source_lines: Sequence[str],
    packages: Sequence[str],
    *,
    arch: str = "amd64",
    installed: str = "",
) -> Resolution:
    """Ask the archives in `source_lines` what installing `packages` would install now.

    `installed` is a dpkg status file's text (what the bootstrap puts in place before apt
    resolves: Berth's initrd stub). Raises ArchiveUnreachable naming the archive that could not
    be read, BuildError when the packages cannot be installed together.
    """
    _prepare(apt_dir, source_lines, installed)
    options = _apt_options(apt_dir, arch)
    update = run(["apt-get", "-q", *options, "--error-on=any", "update"], check=False, capture=True)
    if update.returncode != 0:
        text = (update.stdout + update.stderr).decode(errors="replace")
        failed = _FAILED.search(text)
        where = f"{failed['uri']} ({failed['why'].strip()})" if failed else _last_error(text)
        raise ArchiveUnreachable(
            f"cannot ask the package archive which versions to install: {where}",
            hint="check the mirror and the network, or build from the cached tree without "
            "asking: ./build.py --offline",
        )
    simulated = run(
        ["apt-get", "-q", *options, "install", "--simulate", "--yes", *packages],
        check=False,
        capture=True,
    )
    out = simulated.stdout.decode(errors="replace")
    if simulated.returncode != 0:
        raise BuildError(
            "the archive cannot install the image's packages together: "
            + _last_error(out + simulated.stderr.decode(errors="replace")),
            hint="check the package names in the image definition (`packages`)",
        )
    found = sorted(
        {
            (m["name"].split(":")[0], m["version"], m["arch"])
            for m in map(_INST.match, out.splitlines())
            if m
        }
    )
    return Resolution(tuple(found), _checksums(options, found))


def _checksums(
    options: Sequence[str], packages: Sequence[tuple[str, str, str]]
) -> dict[tuple[str, str, str], str]:
    if not packages:
        return {}
    shown = run(
        ["apt-cache", *options, "show", *(f"{n}={v}" for n, v, _ in packages)],
        check=False,
        capture=True,
    )
    sums: dict[tuple[str, str, str], str] = {}
    for stanza in shown.stdout.decode(errors="replace").split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " "
        )
        key = (fields.get("Package", ""), fields.get("Version", ""), fields.get("Architecture", ""))
        if key in set(packages) and "SHA256" in fields:
            sums.setdefault(key, fields["SHA256"].strip())
    return sums


def _last_error(text: str) -> str:
    errors = [line for line in text.splitlines() if line.startswith(("E:", "W:"))]
    return (errors or text.strip().splitlines() or ["no output"])[-1]
