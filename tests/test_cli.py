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
