"""Every refusal of `Agent.apply`, one test each, with what it must leave behind.

Refused before the first payload byte: the disk image, the ESP (names and contents) and the boot
order are byte-identical. Failed while streaming: the booted slot (its bytes and its partition
entries), the ESP and the boot order are identical, and the inactive slot reads `_writing`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from builder import publish as pub
from builder.publish import releases
from tests.support.machine import FakeMachine, Site, make_agent, release_manifest
from tests.support.misbehaving_server import MisbehavingServer, Misbehaviour
from tests.support.servers import NginxServer
from updater.agent import Agent
from updater.disk.slots import SlotState
from updater.errors import (
    DownloadError,
    LengthMismatchError,
    RefusedError,
    ReleaseMismatchError,
    SlotError,
    SlowRetrievalError,
    VerificationError,
)
from updater.release.manifest import PAYLOAD_FILES, Manifest, describe
from updater.release.version import Version
from updater.update import trust
from updater.update.machine import FetchOptions

FAST = FetchOptions(
    timeout=(2.0, 2.0), attempts=2, backoff=0.0, state_interval=64 * 1024, state_seconds=0.0
)


def refused(
    fake: FakeMachine, agent: Agent, error: type[Exception], pattern: str, **apply: object
) -> None:
    """apply() fails with `error` matching `pattern` and leaves everything byte-identical."""
    before = fake.snapshot()
    with pytest.raises(error, match=pattern):
        agent.apply(**apply)  # type: ignore[arg-type]
    assert fake.snapshot() == before
    assert not (fake.run / "reboot-required").exists()


def failed_midway(fake: FakeMachine, agent: Agent, error: type[Exception], pattern: str) -> None:
    """apply() fails while streaming: only the inactive slot changed, and it reads `_writing`."""
    booted_before, _ = fake.slots()
    region = hashlib.sha256(
        fake.region(booted_before.data_offset, booted_before.data_size)
        + fake.region(booted_before.verity_offset, booted_before.verity_size)
    ).hexdigest()
    esp, order = fake.esp_tree(), fake.boot_order()
    with pytest.raises(error, match=pattern):
        agent.apply()
    booted, inactive = fake.slots()
    assert booted == booted_before  # the GPT entries of the booted slot
    assert (
        region
        == hashlib.sha256(
            fake.region(booted.data_offset, booted.data_size)
            + fake.region(booted.verity_offset, booted.verity_size)
        ).hexdigest()
    )
    assert (fake.esp_tree(), fake.boot_order()) == (esp, order)
    assert inactive.state is SlotState.WRITING
    assert (inactive.data.name, inactive.verity.name) == ("_writing", "_writing")
    assert not (fake.run / "reboot-required").exists()


# -- the repository's metadata ------------------------------------------------------------------


def test_bad_signature(site: Site, fake: FakeMachine) -> None:
    site.publish(site.release("1.1.0"))
    path = site.repo / "metadata/timestamp.json"
    doc = json.loads(path.read_text())
    doc["signed"]["expires"] = "2099-01-01T00:00:00Z"
    path.write_text(json.dumps(doc))
    refused(fake, make_agent(fake, site), trust.BadSignature, r"refused .*signature check failed")


def test_expired_metadata(site: Site, fake: FakeMachine) -> None:
    site.publish(site.release("1.1.0"), now=datetime.now(UTC) - timedelta(days=3))
    refused(fake, make_agent(fake, site), trust.MetadataExpired, r"refused .*has expired")


def test_older_metadata_is_a_rollback(site: Site, fake: FakeMachine) -> None:
    site.publish(site.release("1.1.0"))
    old = site.base / "old-repo"
    shutil.copytree(site.repo, old)
    site.publish(site.release("1.2.0"))
    agent = make_agent(fake, site)
    agent.check()  # this machine has now seen the newer metadata
    shutil.rmtree(site.repo)
    shutil.copytree(old, site.repo)
    refused(fake, agent, trust.RollbackRefused, r"refused .*older metadata .*\(rollback\)")


def test_mix_and_match(site: Site, fake: FakeMachine) -> None:
    site.publish(site.release("1.1.0"))
    old_targets = (site.repo / "metadata/1.targets.json").read_bytes()
    site.publish(site.release("1.2.0"))
    (site.repo / "metadata/2.targets.json").write_bytes(old_targets)
    refused(fake, make_agent(fake, site), trust.MetadataMismatch, "mixed repository states")


# -- the payload's length and hash ------------------------------------------------------------


def test_a_target_whose_length_differs(site: Site, fake: FakeMachine) -> None:
    release = site.release("1.1.0")
    site.publish(release)
    served = site.payload(release, "root.erofs")
    served.write_bytes(served.read_bytes() + b"more")
    refused(
        fake,
        make_agent(fake, site),
        LengthMismatchError,
        r"refused .*root\.erofs: the server declares root\.erofs as \d+ bytes, the signed "
        r"metadata says \d+ \(target length differs\)",
    )


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        # root.erofs has no sha256 pass: its verity tree proves each block (install.py, step 7)
        (
            "root.erofs",
            r"refused: the data written to slot B has verity root hash [0-9a-f]{64}, the signed "
            r"release says [0-9a-f]{64}",
        ),
        (
            "root.verity",
            r"refused .*root\.verity: its \d+ bytes hash to sha256 [0-9a-f]{64}, the trusted "
            r"metadata",
        ),
    ],
)
def test_a_target_whose_hash_differs(
    site: Site, fake: FakeMachine, name: str, pattern: str
) -> None:
    release = site.release("1.1.0")
    site.publish(release)
    served = site.payload(release, name)
    served.write_bytes(os.urandom(served.stat().st_size))
    failed_midway(fake, make_agent(fake, site), VerificationError, pattern)


def _changed_and_signed(release: Path, name: str, offset: int) -> None:
    """Flip a byte of a payload file and describe the result in the release manifest, as a
    broken build would: TUF then signs the changed file, the root hash stays as it was."""
    path = release / name
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(data)
    manifest = release_manifest(release)
    files = describe({n: release / n for n in PAYLOAD_FILES})
    (release / "manifest.json").write_text(replace(manifest, files=files).to_json())


def test_signed_data_whose_verity_root_hash_differs(site: Site, fake: FakeMachine) -> None:
    release = site.release("1.1.0")
    _changed_and_signed(release, "root.erofs", 100_000)
    site.publish(release)
    failed_midway(
        fake,
        make_agent(fake, site),
        VerificationError,
        r"refused: the data written to slot B has verity root hash [0-9a-f]{64}, the signed "
        r"release says [0-9a-f]{64}",
    )


def test_a_signed_hash_tree_that_does_not_match_its_data(site: Site, fake: FakeMachine) -> None:
    release = site.release("1.1.0")
    _changed_and_signed(release, "root.verity", 4096 + 40)  # the data blocks' level
    site.publish(release)
    failed_midway(
        fake,
        make_agent(fake, site),
        VerificationError,
        r"refused: the hash tree in slot B is not the one its data gives \(they first differ "
        r"at byte 4136 of the tree\)",
    )


def served_by(
    site: Site,
    fake: FakeMachine,
    misbehaving: Callable[..., MisbehavingServer],
    rule: Misbehaviour,
    **opts: object,
) -> Agent:
    srv = misbehaving(site.repo)
    srv.rules.append(rule)
    return make_agent(fake, site, url=srv.url + "/", options=replace(FAST, **opts))  # type: ignore[arg-type]


def test_endless_data(
    site: Site, fake: FakeMachine, misbehaving: Callable[..., MisbehavingServer]
) -> None:
    site.publish(site.release("1.1.0"))
    agent = served_by(site, fake, misbehaving, Misbehaviour("root.erofs", endless=True))
    failed_midway(
        fake,
        agent,
        LengthMismatchError,
        r"refused .*root\.erofs: the server sent more than the "
        r"trusted length of \d+ bytes \(endless data\)",
    )


def test_slow_retrieval(
    site: Site, fake: FakeMachine, misbehaving: Callable[..., MisbehavingServer]
) -> None:
    site.publish(site.release("1.1.0"))
    rule = Misbehaviour("root.erofs", delay=0.05, piece=1024)
    agent = served_by(site, fake, misbehaving, rule, min_rate=100_000, rate_window=0.3, attempts=1)
    failed_midway(
        fake, agent, SlowRetrievalError, r"refused .*root\.erofs: .* below the minimum .*slow"
    )


def test_connection_reset_after_some_bytes(
    site: Site, fake: FakeMachine, misbehaving: Callable[..., MisbehavingServer]
) -> None:
    site.publish(site.release("1.1.0"))
    agent = served_by(
        site, fake, misbehaving, Misbehaviour("root.erofs", cut_at=100_000, reset=True)
    )
    failed_midway(
        fake, agent, DownloadError, r"refused .*root\.erofs: connection failed after \d+ of \d+"
    )


def test_connection_reset_on_the_first_request(
    site: Site, fake: FakeMachine, misbehaving: Callable[..., MisbehavingServer]
) -> None:
    site.publish(site.release("1.1.0"))
    agent = served_by(site, fake, misbehaving, Misbehaviour("root.erofs", reset_at_once=True))
    refused(fake, agent, DownloadError, r"refused .*root\.erofs: cannot reach root\.erofs")


def test_repository_reset_on_the_first_request(
    site: Site, fake: FakeMachine, misbehaving: Callable[..., MisbehavingServer]
) -> None:
    site.publish(site.release("1.1.0"))
    agent = served_by(site, fake, misbehaving, Misbehaviour("timestamp.json", reset_at_once=True))
    refused(fake, agent, trust.RepositoryUnreachable, r"cannot fetch repository metadata")


def test_http_404(site: Site, fake: FakeMachine) -> None:
    release = site.release("1.1.0")
    site.publish(release)
    site.payload(release, "root.verity").unlink()
    refused(
        fake,
        make_agent(fake, site),
        DownloadError,
        r"refused .*root\.verity: root\.verity "
        r"answers HTTP 404 Not Found",
    )


def test_http_500(site: Site, fake: FakeMachine, tmp_path: Path) -> None:
    site.publish(site.release("1.1.0"))
    failing = r"location ~ \.uki\.efi$ { return 500; }"
    with NginxServer(site.repo, tmp_path / "nginx-500", failing) as server:
        agent = make_agent(fake, site, url=server.url, options=FAST)
        refused(
            fake,
            agent,
            DownloadError,
            r"refused .*uki\.efi: uki\.efi answers HTTP 500 "
            r"Internal Server Error",
        )


# -- what is being installed -------------------------------------------------------------------


def test_nothing_to_install(site: Site, fake: FakeMachine) -> None:
    site.publish(site.release("1.0.0"))
    refused(
        fake,
        make_agent(fake, site),
        RefusedError,
        r"refused to apply: no release newer than "
        r"the booted 1\.0\.0 to install for containerhost \(x86_64\) in channel stable",
    )


def test_downgrade_needs_allow_downgrade(site: Site, fake: FakeMachine) -> None:
    site.publish(site.release("0.9.0"))
    agent = make_agent(fake, site)
    refused(
        fake,
        agent,
        RefusedError,
        r"refused to install 0\.9\.0: older than the booted 1\.0\.0; "
        "pass --allow-downgrade",
        version=Version(0, 9, 0),
    )
    applied = agent.apply(version=Version(0, 9, 0), allow_downgrade=True)
    assert (applied.version, applied.slot) == (Version(0, 9, 0), "B")
    assert fake.boot_order() == ("berth_1.0.0.efi", "berth_0.9.0+3.efi")


def test_a_release_only_for_another_image_or_arch(site: Site, fake: FakeMachine) -> None:
    site.publish(site.release("1.1.0", image="otherimage"))
    site.publish(site.release("1.2.0", arch="aarch64"))
    agent = make_agent(fake, site)
    refused(
        fake,
        agent,
        RefusedError,
        r"refused to install 1\.1\.0: not in channel stable for "
        r"containerhost \(x86_64\)",
        version=Version(1, 1, 0),
    )
    refused(
        fake,
        agent,
        RefusedError,
        "refused to install 1.2.0: not in channel",
        version=Version(1, 2, 0),
    )
    refused(fake, agent, RefusedError, "no release newer than the booted")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "image",
            "otherimage",
            r"its manifest.json is for image 'otherimage', this machine runs "
            r"'containerhost'",
        ),
        (
            "arch",
            "aarch64",
            r"its manifest.json is for architecture 'aarch64', this machine "
            r"runs 'x86_64'",
        ),
    ],
)
def test_a_payload_for_another_image_or_architecture(
    site: Site,
    fake: FakeMachine,
    monkeypatch: pytest.MonkeyPatch,
    field: str,
    value: str,
    message: str,
) -> None:
    # A publisher's mistake, validly signed: the channel lists the release for this machine but
    # the release's own manifest.json says it was built for something else.
    release = site.release("1.1.0", **{field: value})
    real = pub.read_release

    def for_this_machine(release_dir: Path) -> Manifest:
        return replace(real(release_dir), image="containerhost", arch="x86_64")

    # Where publish() looks it up: the module that defines both, not the package's re-export.
    monkeypatch.setattr(releases, "read_release", for_this_machine)
    site.publish(release)
    refused(fake, make_agent(fake, site), ReleaseMismatchError, r"refused .*1\.1\.0.*: " + message)


def test_not_enough_space_in_the_slot(site: Site, fake: FakeMachine) -> None:
    release = site.release("1.1.0", data_size=5 * 1024 * 1024)
    site.publish(release)
    size = release_manifest(release).files["root.erofs"].size
    refused(
        fake,
        make_agent(fake, site),
        SlotError,
        rf"refused: root\.erofs is 5\.2 MB but slot B "
        rf"holds 4\.2 MB \({size} > 4194304 bytes\)",
    )
