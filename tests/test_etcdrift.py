"""/etc files that stopped following the image: the build lists its /etc, the agent keeps the
booted release's list when it installs an update, and the new release's boots name each file
that the machine changed (an upper-layer file, a whiteout, a replaced directory) and the release
changed too."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from builder.etclist import ETC_LIST, etc_list
from tests.support import REPO
from tests.support.machine import FakeMachine, Site, make_agent, release_manifest
from updater.cli import main as cli_main
from updater.release.version import Version
from updater.update import etcdrift
from updater.update.machine import Machine

V1, V2 = Version(1, 0, 0), Version(1, 1, 0)


def image(tmp_path: Path, name: str, files: dict[str, str]) -> Path:
    tree = tmp_path / name
    for path, text in files.items():
        (tree / "etc" / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / "etc" / path).write_text(text)
    out = tmp_path / f"{name}.json"
    out.write_bytes(etc_list(tree))
    return out


OLD = {
    "ssh/sshd_config": "a",
    "motd": "hello",
    "app/a.conf": "1",
    "app/b.conf": "2",
    "same": "x",
    "passwd": "root\n",
}
# passwd changes too (a new system user), but the machine gets those through sysusers: no drift.
NEW = {**OLD, "ssh/sshd_config": "b", "app/b.conf": "3", "passwd": "root\ntinyproxy\n"}


@pytest.fixture
def upper(tmp_path: Path) -> Path:
    """The machine's changes: sshd_config edited, motd and same edited, app/ replaced."""
    up = tmp_path / "upper"
    (up / "ssh").mkdir(parents=True)
    (up / "ssh/sshd_config").write_text("mine")
    (up / "same").write_text("mine too")
    (up / "passwd").write_text("root\ndora\n")
    (up / "app").mkdir()
    os.setxattr(up / "app", etcdrift.OPAQUE, b"y")
    os.mknod(up / "motd", 0o600 | 0o020000, os.makedev(0, 0))  # the operator deleted it
    return up


def test_files_changed_here_and_by_the_release_are_named(tmp_path: Path, upper: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    etcdrift.keep_booted_list(image(tmp_path, "v1", OLD), state, V1)
    after = image(tmp_path, "v2", NEW)
    # sshd_config: both changed it; app/b.conf: under the machine's own app/; motd and same:
    # the machine changed them, the release did not.
    assert etcdrift.drift(state, after, upper, V2) == ("/etc/app/b.conf", "/etc/ssh/sshd_config")
    # Booted back into the release the list came from (a rollback): nothing to say.
    assert etcdrift.drift(state, after, upper, V1) == ()


def test_a_mode_change_or_a_new_file_counts_and_no_list_is_no_report(
    tmp_path: Path, upper: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    assert etcdrift.drift(state, tmp_path / "none.json", upper, V2) == ()  # nothing kept
    etcdrift.keep_booted_list(image(tmp_path, "v1", {"ssh/sshd_config": "a"}), state, V1)
    tree = tmp_path / "v2"
    (tree / "etc/ssh").mkdir(parents=True)
    (tree / "etc/ssh/sshd_config").write_text("a")
    os.chmod(tree / "etc/ssh/sshd_config", 0o600)
    (tree / "etc/same").write_text("new in v2")
    (tmp_path / "v2.json").write_bytes(etc_list(tree))
    assert etcdrift.drift(state, tmp_path / "v2.json", upper, V2) == (
        "/etc/same",
        "/etc/ssh/sshd_config",
    )
    (tmp_path / "v2.json").write_text("{not json")
    assert etcdrift.drift(state, tmp_path / "v2.json", upper, V2) == ()


def test_the_list_is_the_same_for_the_same_tree_and_names_links(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/os-release").symlink_to("../usr/lib/os-release")
    (tree / "etc/hosts").write_text("127.0.0.1 localhost\n")
    files = json.loads(etc_list(tree))["files"]
    assert files["os-release"] == "link:../usr/lib/os-release"
    assert files["hosts"].startswith("sha256:") and files["hosts"].endswith(":0644")
    assert etc_list(tree) == etc_list(tree)


def test_builder_and_agent_agree_on_where_the_list_is() -> None:
    default = Machine.__dataclass_fields__["etc_list"].default
    assert str(default) == ETC_LIST


def test_an_update_keeps_the_booted_list_and_its_boots_report(
    site: Site, fake: FakeMachine, tmp_path: Path
) -> None:
    machine = fake.machine(site.keys / "root.json")
    machine.etc_list.parent.mkdir(parents=True)
    machine.etc_list.write_bytes(image(tmp_path, "v1", OLD).read_bytes())
    (machine.etc_upper / "ssh").mkdir(parents=True)
    (machine.etc_upper / "ssh/sshd_config").write_text("mine")
    release = site.release("1.1.0")
    site.publish(release)
    make_agent(fake, site).apply()
    kept = json.loads((machine.state_dir / etcdrift.BEFORE).read_text())
    assert kept["version"] == "1.0.0"
    # The new release boots, with its own list.
    machine.etc_list.write_bytes(image(tmp_path, "v2", NEW).read_bytes())
    fake.boot(V2, release_manifest(release).roothash)
    agent = make_agent(fake, site)
    assert agent.status().etc_drift == ("/etc/ssh/sshd_config",)
    assert agent.after_boot().etc_drift == ("/etc/ssh/sshd_config",)


REVERT = REPO / "overlays/base/usr/lib/berth/initrd/etc-revert"


def test_etc_revert_lists_plain_paths_and_refuses_the_rest(tmp_path: Path) -> None:
    assert etcdrift.schedule_revert(tmp_path, ["/etc/ssh/sshd_config"]) == ["ssh/sshd_config"]
    assert etcdrift.schedule_revert(tmp_path, ["/etc/motd", "/etc/ssh/sshd_config"]) == [
        "motd",
        "ssh/sshd_config",
    ]
    listed = (tmp_path / etcdrift.REVERT_LIST).read_text()
    assert listed == "ssh/sshd_config\nmotd\n"
    for bad in ["/etc", "etc/motd", "/etc/../root/x", "/etc/./motd", "/var/x", "/etc/a\nb"]:
        with pytest.raises(ValueError, match="expected a plain absolute path under /etc"):
            etcdrift.schedule_revert(tmp_path, ["/etc/ok", bad])
    assert (tmp_path / etcdrift.REVERT_LIST).read_text() == listed  # nothing half-listed


def test_the_initrd_drops_the_listed_copies_and_nothing_outside(tmp_path: Path) -> None:
    root = tmp_path / "sysroot"
    upper = root / "var/lib/berth/etc/upper"
    (upper / "ssh").mkdir(parents=True)
    (upper / "ssh/sshd_config").write_text("mine")
    (upper / "app").mkdir()
    (upper / "app/a.conf").write_text("mine")
    os.mknod(upper / "motd", 0o600 | 0o020000, os.makedev(0, 0))  # a whiteout
    outside = tmp_path / "outside"
    (outside / "precious").mkdir(parents=True)
    (upper / "link").symlink_to(outside)
    (upper / "kept").write_text("not listed")
    etcdrift.schedule_revert(root / "var", ["/etc/ssh/sshd_config", "/etc/app", "/etc/motd"])
    with (root / "var" / etcdrift.REVERT_LIST).open("a") as f:
        f.write("link/precious\n../../../outside\n")  # as if written by something else
    result = subprocess.run(
        [str(REVERT)],
        env={"BERTH_SYSROOT": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert not (upper / "ssh/sshd_config").exists() and (upper / "ssh").is_dir()
    assert not (upper / "app").exists() and not (upper / "motd").exists()
    assert (upper / "kept").exists() and (outside / "precious").is_dir()
    assert "/etc/link/precious is under a symbolic link" in result.stdout
    assert "not a plain path; skipped" in result.stdout
    assert "/etc/motd follows the image again" in result.stdout
    assert not (root / "var" / etcdrift.REVERT_LIST).exists()


def test_the_cli_lists_and_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["etc-revert", "--var", str(tmp_path), "/etc/motd"]) == 0
    assert "/etc/motd: the image's version comes back at the next boot" in capsys.readouterr().out
    assert cli_main(["etc-revert", "--var", str(tmp_path), "/usr/lib/os-release"]) == 2
    assert "expected a plain absolute path under /etc" in capsys.readouterr().err
