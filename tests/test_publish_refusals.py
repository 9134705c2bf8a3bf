"""What publishing refuses, and that a refusal changes nothing: keys others could read, failures
in the middle of a publish, read-only commands pointed at a missing repository."""

from __future__ import annotations

import errno
import os
import re
import shlex
import stat
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner

from builder import publish as pub
from builder.publish import PublishError
from tests.support.releases import make_release
from updater.release.version import Version

NOW = datetime(2025, 11, 22, 8, 0, tzinfo=UTC)

Entry = tuple[str, int, int, bytes | str | None]


def snapshot(path: Path) -> dict[str, Entry] | None:
    """Every file, directory and link under `path` with its kind, mode, owner and content; None
    when `path` does not exist."""
    if not path.exists():
        return None
    tree: dict[str, Entry] = {}
    for p in [path, *sorted(path.rglob("*"))]:
        st = p.lstat()
        content: bytes | str | None = None
        if stat.S_ISREG(st.st_mode):
            content = p.read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(p)
        tree[str(p.relative_to(path))] = (
            stat.filemode(st.st_mode),
            st.st_uid,
            st.st_size if stat.S_ISREG(st.st_mode) else 0,
            content,
        )
    return tree


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    keys_dir = tmp_path / "keys"
    pub.init_keys(keys_dir, now=NOW)
    return keys_dir


@pytest.fixture
def repo(tmp_path: Path, keys: Path) -> Path:
    repo_dir = tmp_path / "repo"
    pub.publish(make_release(tmp_path / "out", "1.2.3"), repo_dir, keys, "stable", now=NOW)
    return repo_dir


# Every operation that reads a private key, or lists them (`keys show`).
KEY_USERS: dict[str, Callable[[Path, Path, Path], object]] = {
    "publish": lambda out, repo, keys: pub.publish(
        make_release(out, "1.3.0"), repo, keys, "stable", now=NOW
    ),
    "refresh": lambda out, repo, keys: pub.refresh(repo, keys, now=NOW),
    "refresh timestamp": lambda out, repo, keys: pub.refresh(
        repo, keys, now=NOW, timestamp_only=True
    ),
    "pull": lambda out, repo, keys: pub.pull(repo, keys, "stable", Version(1, 2, 3), now=NOW),
    "max-version": lambda out, repo, keys: pub.set_max_version(
        repo, keys, "stable", Version(1, 2, 9), now=NOW
    ),
    "rotate": lambda out, repo, keys: pub.rotate_key(keys, "targets", now=NOW),
    "renew-root": lambda out, repo, keys: pub.renew_root(keys, now=NOW),
    "keys show": lambda out, repo, keys: pub.describe_keys(keys),
}


@pytest.mark.parametrize("operation", sorted(KEY_USERS))
@pytest.mark.parametrize(
    ("name", "mode", "fix"),
    [
        ("targets.pem", 0o644, "chmod 600"),
        ("timestamp.pem", 0o640, "chmod 600"),
        ("root-1.pem", 0o604, "chmod 600"),  # not needed to publish, and still refused
        ("snapshot.pem", 0o620, "chmod 600"),
        (".", 0o755, "chmod 700"),
        (".", 0o770, "chmod 700"),
        ("root.json", 0o664, "chmod go-w"),
        ("1.root.json", 0o646, "chmod go-w"),
    ],
)
def test_keys_others_can_read_or_change_are_refused(
    tmp_path: Path, keys: Path, repo: Path, operation: str, name: str, mode: int, fix: str
) -> None:
    path = keys if name == "." else keys / name
    path.chmod(mode)
    before = (snapshot(keys), snapshot(repo))
    with pytest.raises(PublishError) as error:
        KEY_USERS[operation](tmp_path / "refused", repo, keys)
    message = str(error.value)
    assert message.startswith(f"keys directory {keys} is not private: ")
    assert f"{'it' if name == '.' else f'the {kind(name)} {path}'} has mode {mode:04o}: " in message
    assert error.value.hint == f"fix it with: {fix} {path}"
    assert (snapshot(keys), snapshot(repo)) == before
    # The command in the hint is the fix.
    subprocess.run(shlex.split(error.value.hint.removeprefix("fix it with: ")), check=True)
    KEY_USERS[operation](tmp_path / "fixed", repo, keys)


def kind(name: str) -> str:
    return "private key" if name.endswith(".pem") else "root metadata"


def test_every_problem_is_named_with_its_fix_at_once(keys: Path) -> None:
    keys.chmod(0o755)
    (keys / "targets.pem").chmod(0o644)
    (keys / "root.json").chmod(0o666)
    with pytest.raises(PublishError) as error:
        pub.describe_keys(keys)
    assert str(error.value) == (
        f"keys directory {keys} is not private: it has mode 0755: group and others can read and "
        f"enter it; the root metadata {keys}/root.json has mode 0666: group and others can write "
        f"it; the private key {keys}/targets.pem has mode 0644: group and others can read it"
    )
    assert error.value.hint == (
        f"fix it with: chmod 700 {keys}; chmod go-w {keys}/root.json; chmod 600 {keys}/targets.pem"
    )


def test_a_path_with_spaces_gets_a_fix_that_can_be_pasted(tmp_path: Path) -> None:
    keys = tmp_path / "signing keys"
    pub.init_keys(keys, now=NOW)
    (keys / "targets.pem").chmod(0o640)
    with pytest.raises(PublishError) as error:
        pub.describe_keys(keys)
    assert error.value.hint == f"fix it with: chmod 600 '{keys}/targets.pem'"


# CI runs as root, as the build does: there these always run.
@pytest.mark.skipif(
    os.geteuid() != 0 and not os.environ.get("CI"),
    reason="giving a file to another user needs root",
)
@pytest.mark.parametrize("name", [".", "targets.pem", "root.json"])
def test_keys_owned_by_another_user_are_refused(tmp_path: Path, keys: Path, name: str) -> None:
    path = keys if name == "." else keys / name
    os.chown(path, 4321, -1)
    with pytest.raises(PublishError) as error:
        pub.refresh(tmp_path / "repo", keys, now=NOW)
    what = "it" if name == "." else str(path)
    assert f"{what} is owned by 4321 (uid 4321), not by root" in str(error.value)
    assert error.value.hint is not None
    assert error.value.hint.startswith(f"fix it with: chown root {path} (chown as root")
    # A key directory someone else owns is not one to create keys in either.
    other = tmp_path / "theirs"
    other.mkdir(mode=0o700)
    os.chown(other, 4321, -1)
    with pytest.raises(PublishError, match=r"theirs is not private: it is owned by 4321"):
        pub.init_keys(other, now=NOW)
    assert list(other.iterdir()) == []


def test_keys_are_created_private_whatever_the_umask(tmp_path: Path) -> None:
    # The mode is given to open(2) and mkdir(2); a umask can only take bits away, never add them,
    # so there is no moment at which a key is readable by others.
    old = os.umask(0)
    try:
        keys = tmp_path / "keys"
        pub.init_keys(keys, root_keys=2, now=NOW)
        pub.rotate_key(keys, "timestamp", now=NOW)
        pub.rotate_key(keys, "root", now=NOW)
    finally:
        os.umask(old)
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    pems = list(keys.glob("*.pem"))
    assert len(pems) == 2 + 3 + 2  # root keys, online keys, the two retired ones
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in pems} == {p.name: 0o600 for p in pems}
    pub.describe_keys(keys)  # and they pass the check


def test_a_missing_keys_directory_is_named_and_not_created(tmp_path: Path, repo: Path) -> None:
    missing = tmp_path / "no-keys"
    before = snapshot(repo)
    for operation in KEY_USERS.values():
        with pytest.raises(PublishError, match=f"no keys directory at {re.escape(str(missing))}$"):
            operation(tmp_path / "out", repo, missing)
    assert not missing.exists()
    assert snapshot(repo) == before


def full_disk(*args: object) -> object:
    raise OSError(errno.ENOSPC, "No space left on device (injected)")


def fail_on_call(number: int, real: Callable[..., object]) -> Callable[..., object]:
    """`real`, except that its `number`th call fails as a full disk would."""
    calls = 0

    def failing(*args: object) -> object:
        nonlocal calls
        calls += 1
        return full_disk() if calls == number else real(*args)

    return failing


def tampered(mp: pytest.MonkeyPatch, out: Path) -> Path:
    # root.erofs is staged before root.verity is found not to match.
    release = make_release(out, "1.3.0")
    data = (release / "root.verity").read_bytes()
    (release / "root.verity").write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
    return release


def other_build(mp: pytest.MonkeyPatch, out: Path) -> Path:
    return make_release(out, "1.2.3")


def signing_fails(mp: pytest.MonkeyPatch, out: Path) -> Path:
    # After the payload, the channel and the targets metadata are staged.
    real = CryptoSigner.sign

    def sign(signer: CryptoSigner, data: bytes) -> object:
        if b'"_type": "snapshot"' in data or b'"_type":"snapshot"' in data:
            raise RuntimeError("HSM unplugged")
        return real(signer, data)

    mp.setattr(CryptoSigner, "sign", sign)
    return make_release(out, "1.3.0")


def disk_full_staging(mp: pytest.MonkeyPatch, out: Path) -> Path:
    # The third file written (uki.efi) fails, after root.erofs and root.verity.
    mp.setattr(os, "fsync", fail_on_call(3, os.fsync))
    return make_release(out, "1.3.0")


def disk_full_renaming(mp: pytest.MonkeyPatch, out: Path) -> Path:
    # Two staged files are in place when the third rename fails.
    mp.setattr(os, "replace", fail_on_call(3, os.replace))
    return make_release(out, "1.3.0")


def disk_full_renaming_timestamp(mp: pytest.MonkeyPatch, out: Path) -> Path:
    # Everything else, root.json included when a root version is new, is in place.
    real = os.replace

    def replace(source: Path, dest: Path) -> object:
        timestamp = str(dest).endswith("/metadata/timestamp.json")
        return full_disk() if timestamp else real(source, dest)

    mp.setattr(os, "replace", replace)
    return make_release(out, "1.3.0")


DISK_FULL = r"the change failed and was undone, the repository is as it was: .*No space left"

# What fails -> (how to make it fail, returning the release to publish; the error it gives).
FAILURES: dict[str, tuple[Callable[[pytest.MonkeyPatch, Path], Path], str]] = {
    "a payload file that is not what the manifest says": (
        tampered,
        r"root\.verity does not match the release manifest",
    ),
    "the same version of another build": (other_build, "already published with other content"),
    "signing the snapshot": (
        signing_fails,
        r"signing the snapshot metadata failed: Failed to sign: HSM unplugged",
    ),
    "a full disk while staging": (disk_full_staging, DISK_FULL),
    "a full disk among the renames": (disk_full_renaming, DISK_FULL),
    "a full disk renaming timestamp.json, the last": (disk_full_renaming_timestamp, DISK_FULL),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
@pytest.mark.parametrize("rotated", [False, True], ids=["", "new root"])
def test_a_failed_publish_leaves_the_repository_as_it_was(
    tmp_path: Path,
    keys: Path,
    repo: Path,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
    rotated: bool,
) -> None:
    if rotated:
        # The publish also copies root version 2 in and replaces metadata/root.json.
        pub.rotate_key(keys, "snapshot", now=NOW)
    before = snapshot(repo)
    make_failing, message = FAILURES[failure]
    release = make_failing(monkeypatch, tmp_path / "next")
    with pytest.raises(PublishError, match=message):
        pub.publish(release, repo, keys, "stable", now=NOW)
    monkeypatch.undo()
    assert snapshot(repo) == before
    # And the repository is still good to publish into.
    assert pub.publish(make_release(tmp_path / "then", "1.4.0"), repo, keys, "stable").changed


@pytest.mark.parametrize("failure", sorted(set(FAILURES) - {"the same version of another build"}))
def test_a_failed_first_publish_creates_nothing(
    tmp_path: Path, keys: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    repo = tmp_path / "sites" / "one" / "repo"
    make_failing, message = FAILURES[failure]
    release = make_failing(monkeypatch, tmp_path / "next")
    with pytest.raises(PublishError, match=message):
        pub.publish(release, repo, keys, "stable", now=NOW)
    monkeypatch.undo()
    assert not (tmp_path / "sites").exists()


def test_a_failed_pull_or_refresh_leaves_the_repository_as_it_was(
    keys: Path, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(repo)
    monkeypatch.setattr(os, "replace", fail_on_call(2, os.replace))
    with pytest.raises(PublishError, match="the repository is as it was"):
        pub.pull(repo, keys, "stable", Version(1, 2, 3), now=NOW)
    monkeypatch.setattr(os, "replace", fail_on_call(2, os.replace))
    with pytest.raises(PublishError, match="the repository is as it was"):
        pub.refresh(repo, keys, now=NOW)
    monkeypatch.undo()
    assert snapshot(repo) == before


READERS: dict[str, Callable[[Path, Path], object]] = {
    "refresh": lambda repo, keys: pub.refresh(repo, keys, now=NOW),
    "refresh timestamp": lambda repo, keys: pub.refresh(repo, keys, timestamp_only=True),
    "pull": lambda repo, keys: pub.pull(repo, keys, "stable", Version(1, 2, 3), now=NOW),
    "pull undo": lambda repo, keys: pub.pull(repo, keys, "stable", Version(1, 2, 3), undo=True),
    "max-version": lambda repo, keys: pub.set_max_version(repo, keys, "stable", None, now=NOW),
    "read channel": lambda repo, keys: pub.read_channel(repo, keys, "stable"),
}


@pytest.mark.parametrize("command", sorted(READERS))
@pytest.mark.parametrize("empty", [False, True], ids=["missing", "empty"])
def test_commands_that_need_a_repository_never_create_one(
    tmp_path: Path, keys: Path, command: str, empty: bool
) -> None:
    repo = tmp_path / "mirror" / "repo"
    if empty:
        repo.mkdir(parents=True)
    before = snapshot(tmp_path / "mirror")
    with pytest.raises(PublishError, match=f"^no repository at {re.escape(str(repo))}$") as error:
        READERS[command](repo, keys)
    assert error.value.hint is not None and "publish a release into it first" in error.value.hint
    assert snapshot(tmp_path / "mirror") == before


def test_a_pin_and_lifting_it_at_once_is_refused(tmp_path: Path, keys: Path, repo: Path) -> None:
    before = snapshot(repo)
    with pytest.raises(PublishError, match=r"max_version 1\.3\.9 and lift_max_version contradict"):
        pub.publish(
            make_release(tmp_path / "next", "1.3.0"),
            repo,
            keys,
            "stable",
            max_version=Version(1, 3, 9),
            lift_max_version=True,
        )
    assert snapshot(repo) == before


def test_a_repository_path_that_is_a_file_is_refused(tmp_path: Path, keys: Path) -> None:
    path = tmp_path / "repo"
    path.write_text("not a repository\n")
    release = make_release(tmp_path / "out", "1.3.0")
    with pytest.raises(
        PublishError, match=f"^{re.escape(str(path))}: expected a repository directory, found a"
    ):
        pub.publish(release, path, keys, "stable", now=NOW)
    with pytest.raises(
        PublishError, match=f"^{re.escape(str(path))}: expected a repository directory, found a"
    ):
        pub.refresh(path, keys, now=NOW)
    assert path.read_text() == "not a repository\n"
