"""./build.py: publishing commands end to end, and errors as messages rather than tracebacks."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.config import DEFAULT_FORMATS, OutputFormat
from builder.publish import read_channel
from cli.build import build_config
from cli.main import main, parser
from tests.support.releases import make_release


def test_keys_publish_pull_refresh(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys, repo = tmp_path / "keys", tmp_path / "repo"
    release = make_release(tmp_path / "out", "1.2.3")
    assert main(["keys", "init", "--keys", str(keys)]) == 0
    assert (keys / "timestamp.pem").stat().st_mode & 0o777 == 0o600
    # A second init must not overwrite anything.
    assert main(["keys", "init", "--keys", str(keys)]) == 1
    assert "never overwritten" in capsys.readouterr().err

    args = ["--repo", str(repo), "--keys", str(keys), "--channel", "beta"]
    assert main(["publish", str(release), *args, "--now"]) == 0
    channel = read_channel(repo, keys, "beta")
    assert [str(r.version) for r in channel.releases] == ["1.2.3"]
    assert not channel.releases[0].pulled

    assert main(["pull", "1.2.3", *args]) == 0
    assert read_channel(repo, keys, "beta").releases[0].pulled
    assert main(["publish", "--refresh", "--repo", str(repo), "--keys", str(keys)]) == 0


def test_publish_without_keys_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    release = make_release(tmp_path / "out", "1.0.0")
    code = main(
        ["publish", str(release), "--repo", str(tmp_path / "r"), "--keys", str(tmp_path / "none")]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "error:" in err and "keys init" in err


def test_bad_version_argument_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["build", "containerhost", "--version", "1.2"])
    assert exit.value.code == 2
    assert "--version: version '1.2' is not MAJOR.MINOR.PATCH" in capsys.readouterr().err


def test_refresh_and_offline_together_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["build", "--refresh", "--offline"])
    assert exit.value.code == 2
    assert "--refresh bootstraps from the archive and --offline never asks it" in (
        capsys.readouterr().err
    )


def test_a_bad_snapshot_argument_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["build", "--snapshot", "yesterday"])
    assert exit.value.code == 2
    assert "'yesterday' is not a snapshot time like 20261201T000000Z" in capsys.readouterr().err


def test_format_flag_replaces_the_definitions_formats() -> None:
    def formats(*argv: str) -> tuple[OutputFormat, ...]:
        args = parser().parse_args(["build", *argv])
        return build_config(args.image, args.formats).formats

    assert formats() == DEFAULT_FORMATS
    assert formats("--format", "vhd", "--format", "raw.zst", "--format", "vhd") == (
        OutputFormat.VHD,
        OutputFormat.RAW_ZST,
    )
    assert formats("--format", "all") == tuple(OutputFormat)


def test_unknown_format_flag_lists_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["build", "--format", "vhdx"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "--format: invalid choice: 'vhdx'" in err
    assert "'raw.zst'" in err


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Keys, a repository with 1.2.3 in beta, and a release 1.3.0 not published yet."""
    keys, repo = tmp_path / "keys", tmp_path / "repo"
    assert main(["keys", "init", "--keys", str(keys)]) == 0
    release = make_release(tmp_path / "out", "1.2.3")
    assert (
        main(
            ["publish", str(release), "--repo", str(repo), "--keys", str(keys), "--channel", "beta"]
        )
        == 0
    )
    return keys, repo, make_release(tmp_path / "out", "1.3.0")


def tree(path: Path) -> dict[str, bytes | None]:
    return {str(p): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["publish", "RELEASE", "--max-version", "1.3.9", "--no-max-version"],
            "--max-version 1.3.9 and --no-max-version contradict each other",
        ),
        (
            ["publish", "--max-version", "1.3.9", "--no-max-version"],
            "--max-version 1.3.9 and --no-max-version contradict each other",
        ),
        (
            ["publish", "--refresh", "--max-version", "1.3.9"],
            "--max-version has no effect with --refresh, which re-signs the repository as it is",
        ),
        (
            ["publish", "--refresh", "--no-max-version"],
            "--no-max-version has no effect with --refresh",
        ),
        (["publish", "--refresh", "--now"], "--now has no effect with --refresh"),
        (["publish", "--refresh", "--channel", "beta"], "--channel has no effect with --refresh"),
        (
            ["publish", "RELEASE", "--refresh", "--channel", "beta", "--now"],
            "the release directory RELEASE, --channel and --now have no effect with --refresh",
        ),
        (
            ["publish", "RELEASE", "--timestamp-only"],
            "--timestamp-only has no effect without --refresh",
        ),
        (["publish", "--timestamp-only"], "--timestamp-only has no effect without --refresh"),
        (["publish", "--now"], "--now has no effect without a release directory"),
        (["publish", "--now", "--max-version", "1.3.9"], "--now has no effect without a release"),
        (["publish"], "publish needs a release directory (out/<image>/<version>), --refresh, or"),
        (
            ["keys", "show", "--root-keys", "3"],
            "--root-keys has no effect with keys show: only keys init",
        ),
        (
            ["keys", "rotate", "targets", "--root-threshold", "2", "--root-keys", "3"],
            "--root-threshold and --root-keys have no effect with keys rotate",
        ),
        (
            ["keys", "renew-root", "--root-threshold", "1"],
            "--root-threshold has no effect with keys renew-root",
        ),
        (
            ["keys", "show", "targets"],
            "the role targets has no effect with keys show: only keys rotate",
        ),
        (["keys", "init", "root"], "the role root has no effect with keys init"),
        (["keys", "rotate"], "keys rotate needs the role whose key it replaces"),
    ],
)
def test_flags_that_contradict_or_would_be_ignored_are_refused(
    site: tuple[Path, Path, Path],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    keys, repo, release = site
    command, *rest = [str(release) if a == "RELEASE" else a for a in argv]
    where = ["--keys", str(keys)] + (["--repo", str(repo)] if command == "publish" else [])
    before = tree(keys.parent)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        main([command, *rest, *where])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {command}: {message.replace('RELEASE', str(release))}" in err
    assert tree(keys.parent) == before


def test_a_pin_alone_and_a_release_with_its_pin_lifted_are_one_change_each(
    site: tuple[Path, Path, Path],
) -> None:
    keys, repo, release = site
    args = ["--repo", str(repo), "--keys", str(keys), "--channel", "beta"]
    assert main(["publish", "--max-version", "1.2.9", *args]) == 0
    assert str(read_channel(repo, keys, "beta").max_version) == "1.2.9"
    assert main(["publish", str(release), "--no-max-version", *args]) == 0
    channel = read_channel(repo, keys, "beta")
    assert channel.max_version is None
    assert [str(r.version) for r in channel.releases] == ["1.2.3", "1.3.0"]
    # First publish, the pin, then the release and the lifted pin in one signed change.
    assert (repo / "metadata/3.targets.json").exists()
    assert not (repo / "metadata/4.targets.json").exists()


def test_keys_show_refuses_a_key_others_can_read(
    site: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    keys, _, _ = site
    (keys / "targets.pem").chmod(0o644)
    capsys.readouterr()
    assert main(["keys", "show", "--keys", str(keys)]) == 1
    err = capsys.readouterr().err
    assert f"the private key {keys}/targets.pem has mode 0644: group and others can read it" in err
    assert f"hint: fix it with: chmod 600 {keys}/targets.pem" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["publish", "--refresh"],
        ["publish", "--refresh", "--timestamp-only"],
        ["publish", "--max-version", "1.2.9"],
        ["publish", "--no-max-version"],
        ["pull", "1.2.3"],
        ["pull", "1.2.3", "--undo"],
    ],
)
def test_commands_on_a_missing_repository_say_so_and_create_nothing(
    site: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    keys, _, _ = site
    missing = keys.parent / "mirror" / "repo"
    capsys.readouterr()
    assert main([*argv, "--repo", str(missing), "--keys", str(keys)]) == 1
    assert f"error: no repository at {missing}\n" in capsys.readouterr().err
    assert not (keys.parent / "mirror").exists()
