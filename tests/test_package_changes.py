"""Each release says what changed in its packages: publish computes it against the release before
it on the channel, the signed channel manifest carries it, and the agent's check, apply and
status show what the update changes on this machine, chained across skipped releases."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from builder import publish as pub
from builder.publish import PublishError
from tests.support.machine import FakeMachine, Site, make_agent
from tests.support.releases import make_release
from updater.cli import format_status, main
from updater.release import channel as ch
from updater.release.packages import (
    PackageChanges,
    PackagesError,
    change_lines,
    compose,
    parse_package_list,
)
from updater.release.version import Version

V = Version.parse
BASE = {"libc6": "2.41-12", "openssl": "3.5.1-1", "curl": "8.14.1-2"}


def listing(packages: dict[str, str]) -> str:
    return "".join(f"{n}\t{v}\tamd64\n" for n, v in sorted(packages.items()))


def with_packages(release: Path, packages: dict[str, str]) -> Path:
    (release / "packages.txt").write_text(listing(packages))
    return release


# -- the lists themselves -------------------------------------------------------------------


def test_between_names_changed_added_and_removed() -> None:
    after = {"libc6": "2.41-12", "openssl": "3.5.1-1+deb13u1", "jq": "1.7.1-6"}
    changes = PackageChanges.between(V("1.0.0"), BASE, after)
    assert changes.lines() == ["openssl 3.5.1-1 → 3.5.1-1+deb13u1", "+jq 1.7.1-6", "-curl 8.14.1-2"]
    assert changes.summary() == "since 1.0.0: 1 changed, 1 added, 1 removed"
    assert PackageChanges.from_dict(json.loads(json.dumps(changes.to_dict())), "x") == changes
    assert not PackageChanges.between(V("1.0.0"), BASE, BASE)


def test_compose_chains_through_the_releases_in_between() -> None:
    steps = {
        V("1.1.0"): PackageChanges(
            V("1.0.0"), added=(("jq", "1"),), changed=(("openssl", "a", "b"),)
        ),
        V("1.2.0"): PackageChanges(
            V("1.1.0"), removed=(("jq", "1"),), changed=(("openssl", "b", "c"),)
        ),
        V("1.3.0"): PackageChanges(V("1.2.0"), changed=(("curl", "8", "9"),), added=(("jq", "2"),)),
    }
    assert compose(V("1.0.0"), steps, V("1.2.0")) == PackageChanges(
        V("1.0.0"), changed=(("openssl", "a", "c"),)
    )
    through = compose(V("1.0.0"), steps, V("1.3.0"))
    assert through is not None and through.lines() == ["curl 8 → 9", "openssl a → c", "+jq 2"]
    assert compose(V("1.1.0"), steps, V("1.3.0")) is not None
    # A booted version the chain never passes through: not known.
    assert compose(V("0.9.0"), steps, V("1.3.0")) is None
    assert compose(V("1.3.0"), steps, V("1.3.0")) == PackageChanges(V("1.3.0"))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ([], "expected an object"),
        ({"since": "1.0"}, "since: expected a version string"),
        ({"since": "1.0.0", "added": [["jq"]]}, "added[0]: expected a list of 2 non-empty strings"),
        ({"since": "1.0.0", "changed": "all"}, "changed: expected a list"),
        ({"since": "1.0.0", "extra": 1}, "unknown field(s): extra"),
    ],
)
def test_malformed_change_lists_name_the_field(raw: object, expected: str) -> None:
    with pytest.raises(PackagesError, match="where") as error:
        PackageChanges.from_dict(raw, "where")
    assert expected in str(error.value)


def test_a_channel_with_a_malformed_change_list_is_refused() -> None:
    doc = {
        "channel": "stable",
        "releases": [
            {
                "image": "containerhost",
                "arch": "x86_64",
                "version": "1.1.0",
                "roothash": "a" * 64,
                "targets": {n: f"containerhost/1.1.0/{n}" for n in ch.RELEASE_TARGETS},
                "waves": {"2048": "2025-11-22T08:00:00Z"},
                "changes": {"since": "1.0.0", "added": "jq"},
            }
        ],
    }
    with pytest.raises(ch.ChannelError, match=r"releases\[0\]\.changes\.added: expected a list"):
        ch.parse(json.dumps(doc), "channels/stable.json")


def test_package_lists_are_checked() -> None:
    assert parse_package_list(listing(BASE), "p") == BASE
    with pytest.raises(PackagesError, match="p: line 2: expected 'name<TAB>version<TAB>"):
        parse_package_list("libc6\t2.41\tamd64\nbroken line\n", "p")


# -- publish --------------------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    pub.init_keys(tmp_path / "keys")
    return tmp_path / "keys"


def channel_release(repo: Path, version: str) -> ch.Release:
    newest = max(
        (repo / "metadata").glob("*.targets.json"), key=lambda p: int(p.name.split(".")[0])
    )
    targets = json.loads(newest.read_text())["signed"]["targets"]
    entry = targets["channels/stable.json"]
    path = repo / "targets/channels" / f"{entry['hashes']['sha256']}.stable.json"
    found = ch.parse(path.read_text(), str(path)).find("containerhost", "x86_64", V(version))
    assert found is not None
    return found


def test_publish_computes_the_changes_since_the_previous_release(
    tmp_path: Path, keys: Path
) -> None:
    repo = tmp_path / "repo"
    out = tmp_path / "out"
    first = pub.publish(with_packages(make_release(out, "1.0.0"), BASE), repo, keys, "stable")
    assert first.changes is None  # nothing before it
    bumped = {**BASE, "openssl": "3.5.1-1+deb13u1"}
    second = pub.publish(with_packages(make_release(out, "1.1.0"), bumped), repo, keys, "stable")
    assert second.changes is not None
    assert second.changes.lines() == ["openssl 3.5.1-1 → 3.5.1-1+deb13u1"]
    assert channel_release(repo, "1.1.0").changes == second.changes
    # Publishing again changes nothing, the list included.
    again = pub.publish(out / "containerhost/1.1.0", repo, keys, "stable")
    assert not again.changed and again.changes == second.changes
    # A pulled release is nobody's "before": 1.2.0 is compared with 1.0.0.
    pub.pull(repo, keys, "stable", V("1.1.0"))
    third = pub.publish(
        with_packages(make_release(out, "1.2.0"), BASE | {"jq": "1.7"}), repo, keys, "stable"
    )
    assert third.changes is not None and third.changes.since == V("1.0.0")
    assert third.changes.lines() == ["+jq 1.7"]


def test_a_release_without_a_package_list_has_no_changes(tmp_path: Path, keys: Path) -> None:
    repo, out = tmp_path / "repo", tmp_path / "out"
    pub.publish(with_packages(make_release(out, "1.0.0"), BASE), repo, keys, "stable")
    result = pub.publish(make_release(out, "1.1.0"), repo, keys, "stable")
    assert result.changes is None and channel_release(repo, "1.1.0").changes is None


def test_a_malformed_package_list_stops_publish_before_anything_is_written(
    tmp_path: Path, keys: Path
) -> None:
    repo, out = tmp_path / "repo", tmp_path / "out"
    pub.publish(with_packages(make_release(out, "1.0.0"), BASE), repo, keys, "stable")
    before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    release = make_release(out, "1.1.0")
    (release / "packages.txt").write_text("openssl 3.5\n")
    with pytest.raises(PublishError, match=r"packages.txt: line 1: expected"):
        pub.publish(release, repo, keys, "stable")
    assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before


# -- the agent ------------------------------------------------------------------------------


def test_check_apply_and_status_show_what_the_update_changes_here(
    site: Site, fake: FakeMachine
) -> None:
    # The machine runs 1.0.0; 1.1.0 bumps openssl, 1.2.0 adds jq: it would get both.
    site.publish(with_packages(site.release("1.0.0"), BASE))
    site.publish(with_packages(site.release("1.1.0"), {**BASE, "openssl": "3.5.1-2"}))
    site.publish(with_packages(site.release("1.2.0"), {**BASE, "openssl": "3.5.1-2", "jq": "1.7"}))
    expected = (
        "package changes since 1.0.0: 1 changed, 1 added, 0 removed",
        "openssl 3.5.1-1 → 3.5.1-2",
        "+jq 1.7",
    )
    selection = make_agent(fake, site).check()
    assert selection.release is not None and change_lines(selection.release.changes) == expected
    out = io.StringIO()
    assert main(["check"], agent_factory=lambda: make_agent(fake, site), out=out) == 0
    assert out.getvalue() == "update available: 1.2.0\n" + "".join(f"  {x}\n" for x in expected)
    make_agent(fake, site).apply()
    status = make_agent(fake, site).status()
    assert (status.pending, status.pending_changes) == ("1.2.0", expected)
    assert json.loads(json.dumps(status.to_json()))["pending_changes"] == list(expected)
    assert "              openssl 3.5.1-1 → 3.5.1-2\n" in format_status(status)
