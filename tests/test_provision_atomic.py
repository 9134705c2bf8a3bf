"""All or nothing: a config that fails at any step, staging or commit, leaves the tree byte for
byte as it was, and the corrected config then applies; `--check --root` sees what apply sees."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.test_provision_apply import HTTPD, root, snapshot  # noqa: F401  (the machine fixture)
from updater.provision.__main__ import main, parse_config
from updater.provision.apply import apply_plan, prepare
from updater.provision.plan import Directory, File, Link, Plan, ProvisionError, Unit, User

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtbGYM1FMgVHE1DX1d8bzqf7ICcRoM2O1ZEGMGA0jmg op@laptop"
HASH = "$6$salt$4mY0R2tY0nDq8pK3oV1yQ0"


def everything() -> Plan:
    """One of each kind of change the commit makes: replacing files, new files in new
    directories, symbolic and hard links, accounts and a home, enabling and disabling units,
    the mode of an existing directory."""
    return Plan(
        source="test.ign",
        format="ignition",
        hostname="node-1",
        directories=(Directory("/var/lib", 0o700),),
        files=(
            File("/etc/berth/existing.conf", b"new\n", overwrite=True),
            File("/etc/app/deep/app.conf", b"key=value\n", 0o600),
        ),
        links=(
            Link("/etc/app/current", "deep/app.conf"),
            Link("/etc/app/hard", "/etc/app/deep/app.conf", hard=True),
        ),
        users=(User("alice", (KEY,), password_hash=HASH), User("root", (KEY,))),
        units=(
            Unit("web.service", HTTPD, enabled=True),
            Unit("image.service", enabled=False),
        ),
    )


@contextlib.contextmanager
def directory_in_place_of(entry: Path, aside: Path) -> Iterator[None]:
    """A non-empty directory where `entry` was, as if someone made it between staging and
    commit; `entry` is put back afterwards."""
    existed = os.path.lexists(entry)
    if existed:
        os.rename(entry, aside)
    entry.mkdir()
    (entry / "inside").write_text("someone else's\n")
    try:
        yield
    finally:
        shutil.rmtree(entry)
        if existed:
            os.rename(aside, entry)


def test_a_commit_that_fails_at_any_step_is_undone(root: Path, tmp_path: Path) -> None:  # noqa: F811
    original = snapshot(root)
    staged = prepare(everything(), root)
    staged.discard()
    destinations = [d for _, d in staged.stage.renames]
    assert len(destinations) >= 12  # each kind above is among them
    for failing in destinations:
        rel = str(failing.relative_to(root))
        prepared = prepare(everything(), root)
        with directory_in_place_of(failing, tmp_path / "aside"):
            with pytest.raises(ProvisionError, match=r"committing the config failed: .*undone"):
                prepared.commit()
            after = snapshot(root)
        # All as it was but the directory put there, and the new parents that hold it.
        theirs = {k for k in after if k == rel or k.startswith(rel + "/")}
        theirs |= {k for k in after if rel.startswith(k + "/") and k not in original}
        assert {k: v for k, v in after.items() if k not in theirs} == {
            k: v for k, v in original.items() if k not in theirs
        }, rel
        for parent in sorted(theirs - {rel, rel + "/inside"}, reverse=True):
            (root / parent).rmdir()
        assert snapshot(root) == original, rel
    apply_plan(everything(), root)
    assert (root / "etc/berth/existing.conf").read_text() == "new\n"
    assert not list(root.rglob(".berth-provision.*"))


def test_a_commit_that_fails_unlinking_or_chmodding_is_undone(
    root: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    original = snapshot(root)
    wanted = root / "etc/systemd/system/multi-user.target.wants/image.service"
    prepared = prepare(everything(), root)
    with (
        directory_in_place_of(wanted, tmp_path / "aside"),
        pytest.raises(ProvisionError, match="committing the config failed"),
    ):
        prepared.commit()
    assert snapshot(root) == original
    # The existing directory whose mode is set turns into a link to nothing.
    prepared = prepare(everything(), root)
    lib = root / "var/lib"
    os.rename(lib, tmp_path / "lib")
    lib.symlink_to("nowhere")
    with pytest.raises(ProvisionError, match="committing the config failed"):
        prepared.commit()
    lib.unlink()
    os.rename(tmp_path / "lib", lib)
    assert snapshot(root) == original
    apply_plan(everything(), root)
    assert not list(root.rglob(".berth-provision.*"))


def nothing(_: Path) -> None:
    pass


@pytest.mark.parametrize(
    ("fault", "broken", "message"),
    [
        (
            nothing,
            Plan("t", "ignition", files=(File("/etc/berth/existing.conf/x", b"x"),)),
            "/etc/berth/existing.conf is a file on this machine, not a directory",
        ),
        (
            lambda r: (r / "etc/app.d").mkdir(),
            Plan("t", "ignition", links=(Link("/etc/app.d", "/var/lib/app", overwrite=True),)),
            "link /etc/app.d: /etc/app.d is a directory on this machine",
        ),
        (
            lambda r: (r / "etc/app.conf").mkdir(),
            Plan("t", "ignition", files=(File("/etc/app.conf", b"x", overwrite=True),)),
            "a directory is there",
        ),
        (
            lambda r: (r / "etc/systemd/system/web.service").mkdir(),
            Plan("t", "ignition", units=(Unit("web.service", HTTPD),)),
            "unit web.service: /etc/systemd/system/web.service is a directory",
        ),
        (
            nothing,
            Plan("t", "ignition", links=(Link("/etc/hard", "/etc/systemd/system", hard=True),)),
            "the target /etc/systemd/system is a directory",
        ),
    ],
)
def test_a_config_the_machine_refuses_changes_nothing_and_the_corrected_one_applies(
    root: Path,  # noqa: F811
    fault: Callable[[Path], None],
    broken: Plan,
    message: str,
) -> None:
    fault(root)
    whole = Plan(
        source="t",
        format="ignition",
        hostname="changed",
        directories=(Directory("/var/lib/new/deep"),),
        files=(File("/etc/new/dir/file", b"data"), *broken.files),
        links=broken.links,
        users=(User("bob", (KEY,)),),
        units=(Unit("ok.service", HTTPD, enabled=True), *broken.units),
    )
    before = snapshot(root)
    with pytest.raises(ProvisionError, match=message):
        apply_plan(whole, root)
    assert snapshot(root) == before
    corrected = Plan(
        source="t",
        format="ignition",
        hostname=whole.hostname,
        directories=whole.directories,
        files=whole.files[:1],
        users=whole.users,
        units=whole.units[:1],
    )
    apply_plan(corrected, root)
    assert (root / "etc/new/dir/file").read_bytes() == b"data"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, to fill for real; skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        why = f"cannot mount a tmpfs here: {done.stderr.decode().strip()}"
        # CI runs as root, as the build does: there the full-disk case must run, never skip.
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    try:
        (mount / "etc").mkdir()
        (mount / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
        (mount / "etc/shadow").write_text("root:*:20000:0:99999:7:::\n")
        (mount / "etc/group").write_text("root:x:0:\n")
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_while_staging_changes_nothing(small_disk: Path) -> None:
    files = (File("/etc/a/first", b"x" * 1000), File("/etc/b/big", b"x" * (1 << 20)))
    full = Plan("t", "ignition", files=files, users=(User("alice"),))
    before = snapshot(small_disk)
    with pytest.raises(ProvisionError, match=r"staging the config failed: .*No space left"):
        apply_plan(full, small_disk)
    assert snapshot(small_disk) == before
    apply_plan(Plan("t", "ignition", files=files[:1], users=(User("alice"),)), small_disk)
    assert (small_disk / "etc/a/first").stat().st_size == 1000


IGNITION_EXISTING = json.dumps(
    {
        "ignition": {"version": "3.4.0"},
        "passwd": {"users": [{"name": "alice", "passwordHash": HASH}]},
        "storage": {
            "files": [
                {"path": "/etc/new.conf", "contents": {"source": "data:,token%3Dsecret-value"}},
                {"path": "/etc/berth/existing.conf", "contents": {"source": "data:,x"}},
            ]
        },
    }
)


def test_check_with_a_root_makes_the_checks_of_apply_and_leaves_the_tree(
    root: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "config.ign"
    config.write_text(IGNITION_EXISTING)
    assert main(["--check", str(config)]) == 0  # nothing to say without a machine
    before = snapshot(root)
    capsys.readouterr()
    assert main(["--check", str(config), "--root", str(root)]) == 1
    assert "file /etc/berth/existing.conf exists and overwrite is false" in capsys.readouterr().out
    (root / "etc/berth/existing.conf").unlink()
    before = snapshot(root)
    assert main(["--check", str(config), "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"applies to {root}: " in out and "user alice created" in out
    assert snapshot(root) == before
    plan = parse_config(config.read_bytes(), str(config))
    assert plan is not None
    apply_plan(plan, root)  # what --check called valid applies


def test_check_shows_no_secrets_unless_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.ign"
    config.write_text(IGNITION_EXISTING)
    assert main(["--check", str(config)]) == 0
    out = capsys.readouterr().out
    assert HASH not in out and "secret-value" not in out
    assert '"password_hash": "<redacted>"' in out
    assert "<redacted> 18 bytes, sha256 " in out
    assert main(["--check", str(config), "--show-secrets"]) == 0
    out = capsys.readouterr().out
    assert HASH in out and "token=secret-value" in out
    with pytest.raises(SystemExit):
        main(["--root", str(tmp_path)])


def test_units_systemd_cannot_start_undo_the_commit(root: Path) -> None:  # noqa: F811
    original = snapshot(root)
    calls: list[list[str]] = []

    def systemctl(argv: Sequence[str]) -> None:
        calls.append(list(argv))
        if argv[1] == "start":
            raise ProvisionError("systemctl start --no-block web.service exited with status 1")

    with pytest.raises(ProvisionError, match="exited with status 1; every change was undone"):
        apply_plan(everything(), root, runner=systemctl, live=True)
    assert snapshot(root) == original
    assert [c[1] for c in calls] == ["daemon-reload", "start", "daemon-reload"]
    apply_plan(everything(), root, runner=lambda _: None, live=True)
    assert (root / "etc/systemd/system/web.service").read_text() == HTTPD
    assert not list(root.rglob(".berth-provision.*"))
