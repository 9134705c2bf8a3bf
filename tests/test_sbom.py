"""The SBOM is valid SPDX 2.3 by the SPDX project's own validator (spdx-tools), and says what
the image holds: the image DESCRIBED, and in it every Debian package, the agent and every
preloaded container image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from spdx_tools.spdx.parser.parse_anything import parse_file
from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

from builder.preload import PreloadedImage
from builder.sbom import AGENT, spdx_document, spdx_id

# Names that SPDX identifiers cannot spell as they are ('+', '_', ':', '~' in versions).
PACKAGES = (
    ("libc6", "2.41-12", "amd64"),
    ("g++", "4:14.2.0-1", "amd64"),
    ("libstdc++6", "14.2.0-19", "amd64"),
    ("python3-tuf", "5.1.0-1~deb13u1", "all"),
    ("libg-2", "1.0", "amd64"),
    ("libg--2", "1.0", "amd64"),
)
IMAGES = (
    PreloadedImage("docker.io/library/nginx:1.27", "a" * 64),
    PreloadedImage("localhost:5000/team/web", "b" * 64),
)


def problems(document: str, tmp_path: Path) -> list[str]:
    path = tmp_path / "sbom.spdx.json"
    path.write_text(document)
    return [m.validation_message for m in validate_full_spdx_document(parse_file(str(path)))]


SUMS = {PACKAGES[0]: "c" * 64, PACKAGES[3]: "d" * 64}


def test_the_sbom_is_valid_spdx(tmp_path: Path) -> None:
    document = spdx_document("containerhost", "2026.1203.0", PACKAGES, IMAGES, SUMS)
    assert problems(document, tmp_path) == []


def test_debs_carry_the_archives_checksums_where_it_gave_them() -> None:
    doc = json.loads(spdx_document("containerhost", "2026.1203.0", PACKAGES, IMAGES, SUMS))
    by_name = {p["name"]: p for p in doc["packages"]}
    assert by_name["libc6"]["checksums"] == [{"algorithm": "SHA256", "checksumValue": "c" * 64}]
    assert by_name["python3-tuf"]["checksums"][0]["checksumValue"] == "d" * 64
    assert "checksums" not in by_name["g++"]


def test_the_validator_would_say_so(tmp_path: Path) -> None:
    # The check above can fail: an identifier SPDX does not allow is reported.
    doc = json.loads(spdx_document("containerhost", "2026.1203.0", PACKAGES))
    doc["packages"][2]["SPDXID"] = "SPDXRef-deb-g++"
    assert problems(json.dumps(doc), tmp_path) != []


def test_it_describes_the_image_which_contains_everything() -> None:
    doc = json.loads(spdx_document("containerhost", "2026.1203.0", PACKAGES, IMAGES))
    top = spdx_id("Image", "containerhost")
    relations = {
        (r["spdxElementId"], r["relationshipType"], r["relatedSpdxElement"])
        for r in doc["relationships"]
    }
    assert ("SPDXRef-DOCUMENT", "DESCRIBES", top) in relations
    ids = [p["SPDXID"] for p in doc["packages"]]
    assert len(set(ids)) == len(ids)  # libg-2 and libg--2 stay apart
    assert {(top, "CONTAINS", i) for i in ids if i != top} <= relations
    by_name = {p["name"]: p for p in doc["packages"]}
    assert by_name[AGENT]["versionInfo"] == "2026.1203.0"
    assert by_name["g++"]["externalRefs"][0]["referenceLocator"] == (
        "pkg:deb/debian/g%2B%2B@4%3A14.2.0-1?arch=amd64"
    )
    nginx = by_name["docker.io/library/nginx:1.27"]
    assert nginx["checksums"] == [{"algorithm": "SHA256", "checksumValue": "a" * 64}]
    assert nginx["externalRefs"][0]["referenceLocator"] == (
        f"pkg:oci/nginx@sha256%3A{'a' * 64}?repository_url=docker.io/library/nginx&tag=1.27"
    )
    assert by_name["localhost:5000/team/web"]["versionInfo"] == "b" * 12


@pytest.mark.parametrize("version", ["2026.1203.0", "2026.1203.0-rc.1+local"])
def test_the_same_inputs_give_the_same_document(version: str) -> None:
    first = spdx_document("base", version, PACKAGES, IMAGES)
    assert first == spdx_document("base", version, PACKAGES, IMAGES)
    assert json.loads(first)["creationInfo"]["created"] == "1970-01-01T00:00:00Z"
