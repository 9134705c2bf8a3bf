"""The image's software bill of materials: an SPDX 2.3 document (JSON) of everything it ships.

The document DESCRIBES one package, the image itself (an operating system), which CONTAINS every
Debian package installed in its tree, the update agent that Berth installs beside them, and each
container image preloaded into its read-only store. Debian packages are named by purl
(`pkg:deb/debian/NAME@VERSION?arch=ARCH`) with the SHA256 of the .deb that the archive's
index gives (builder/archive.py), container images by theirs (`pkg:oci/...`) with the
sha256 of their config as the checksum. Everything is derived from the build's inputs, so two
builds of the same inputs write the same document (no timestamp, no random namespace).

The SPDX project's own validator (spdx-tools) checks what this writes in tests/test_sbom.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from builder.preload import PreloadedImage

NAMESPACE = "https://berth.invalid/spdx"
# SPDX identifiers allow letters, digits, '.' and '-' only.
_NOT_IN_ID = re.compile(r"[^A-Za-z0-9.-]")
AGENT = "berth-update"
# What Berth does not assert about a package: its licences and copyright are the package's own.
_UNASSERTED = {
    "downloadLocation": "NOASSERTION",
    "filesAnalyzed": False,
    "copyrightText": "NOASSERTION",
    "licenseConcluded": "NOASSERTION",
    "licenseDeclared": "NOASSERTION",
}


def _purl(locator: str) -> list[dict[str, str]]:
    return [
        {
            "referenceCategory": "PACKAGE-MANAGER",
            "referenceType": "purl",
            "referenceLocator": locator,
        }
    ]


def spdx_id(kind: str, name: str) -> str:
    """`SPDXRef-<kind>-<name>` with every character SPDX does not allow spelled out, so that two
    names never share an identifier (`g++` and `g--` stay apart)."""
    spelled = _NOT_IN_ID.sub(lambda m: f"-x{ord(m.group()):x}-", name.replace("-", "--"))
    return f"SPDXRef-{kind}-{spelled}"


def spdx_document(
    image: str,
    version: str,
    packages: Sequence[tuple[str, str, str]],
    preloaded: Sequence[PreloadedImage] = (),
    sha256: Mapping[tuple[str, str, str], str] | None = None,
) -> str:
    """The SBOM of image `image` at `version`: `packages` are (name, version, arch) as installed,
    `sha256` the checksums of their .debs where the archive gave them."""
    top = spdx_id("Image", image)
    entries: list[dict[str, Any]] = [
        {
            "SPDXID": top,
            "name": f"berth-{image}",
            "versionInfo": version,
            "primaryPackagePurpose": "OPERATING-SYSTEM",
            "supplier": "Organization: Berth",
            **_UNASSERTED,
        },
        {
            "SPDXID": spdx_id("Berth", AGENT),
            "name": AGENT,
            "versionInfo": version,
            "primaryPackagePurpose": "APPLICATION",
            "supplier": "Organization: Berth",
            "comment": "the update agent and first-boot provisioner, installed into "
            "/usr/lib/python3/dist-packages/updater",
            **_UNASSERTED,
        },
    ]
    for name, ver, arch in packages:
        checksum = (sha256 or {}).get((name, ver, arch))
        sums = [{"algorithm": "SHA256", "checksumValue": checksum}] if checksum else []
        entries.append(
            {
                **({"checksums": sums} if sums else {}),
                "SPDXID": spdx_id("deb", f"{arch}.{name}"),
                "name": name,
                "versionInfo": ver,
                "primaryPackagePurpose": "LIBRARY",
                "supplier": "Organization: Debian",
                **_UNASSERTED,
                "externalRefs": _purl(
                    f"pkg:deb/debian/{quote(name)}@{quote(ver)}?arch={quote(arch)}"
                ),
            }
        )
    for found in preloaded:
        repository, _, tag = found.name.rpartition(":")
        if "/" in tag or not repository:  # "host:port/name" without a tag
            repository, tag = found.name, ""
        *_, last = repository.split("/")
        locator = f"pkg:oci/{quote(last)}@sha256%3A{found.image_id}"
        locator += f"?repository_url={quote(repository, safe='/')}"
        if tag:
            locator += f"&tag={quote(tag)}"
        entries.append(
            {
                "SPDXID": spdx_id("Container", found.name),
                "name": found.name,
                "versionInfo": tag or found.image_id[:12],
                "primaryPackagePurpose": "CONTAINER",
                "checksums": [{"algorithm": "SHA256", "checksumValue": found.image_id}],
                "comment": "preloaded into the read-only image store /usr/lib/containers/storage",
                **_UNASSERTED,
                "externalRefs": _purl(locator),
            }
        )
    relationships = [
        {
            "spdxElementId": "SPDXRef-DOCUMENT",
            "relationshipType": "DESCRIBES",
            "relatedSpdxElement": top,
        }
    ] + [
        {"spdxElementId": top, "relationshipType": "CONTAINS", "relatedSpdxElement": e["SPDXID"]}
        for e in entries[1:]
    ]
    doc = {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"berth-{image}-{version}",
        "documentNamespace": f"{NAMESPACE}/{quote(image)}/{quote(version)}",
        "creationInfo": {"created": "1970-01-01T00:00:00Z", "creators": ["Tool: berth-build"]},
        "packages": entries,
        "relationships": relationships,
    }
    return json.dumps(doc, indent=1) + "\n"
