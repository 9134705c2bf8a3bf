"""Package sources: the host's apt configuration (both formats), and the mirror overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.config import ImageConfig
from builder.errors import BuildError
from builder.rootfs import AptSource, _host_apt_uris, apt_sources

MIRROR = "http://mirror.example/debian"
SECURITY = "http://security.example/debian-security"


@pytest.fixture(autouse=True)
def no_mirror_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BERTH_MIRROR", raising=False)
    monkeypatch.delenv("BERTH_SECURITY_MIRROR", raising=False)


@pytest.fixture
def apt(tmp_path: Path) -> Path:
    directory = tmp_path / "apt"
    (directory / "sources.list.d").mkdir(parents=True)
    return directory


def config(suite: str = "trixie", mirror: str | None = None) -> ImageConfig:
    return ImageConfig(name="test", path=Path("/nonexistent/test.toml"), suite=suite, mirror=mirror)


ONE_LINE = f"""\
# deb http://commented.example/debian trixie main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {MIRROR} trixie main
deb-src {MIRROR} trixie main
deb {MIRROR} trixie-updates main contrib  # trailing comment
deb {SECURITY} trixie-security main
deb   broken-line-with-two-words
"""

DEB822 = f"""\
# Modernized from /etc/apt/sources.list
Types: deb deb-src
URIs: {MIRROR} http://second.example/debian
Suites: trixie trixie-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: {SECURITY}
Suites: trixie-security
Components: main
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 URIs: http://continuation.example/not-a-field
 -----END PGP PUBLIC KEY BLOCK-----

Types: deb-src
URIs: http://sources-only.example/debian
Suites: trixie

Enabled: no
Types: deb
URIs: http://disabled.example/debian
Suites: trixie
"""


def test_one_line_format(apt: Path) -> None:
    (apt / "sources.list").write_text(ONE_LINE)
    assert _host_apt_uris(apt) == [
        (MIRROR, "trixie"),
        (MIRROR, "trixie-updates"),
        (SECURITY, "trixie-security"),
    ]


def test_list_files_in_sources_list_d_are_read_in_order(apt: Path) -> None:
    (apt / "sources.list.d/b.list").write_text("deb http://b.example/debian trixie main\n")
    (apt / "sources.list.d/a.list").write_text("deb http://a.example/debian trixie main\n")
    (apt / "sources.list.d/ignored.list.disabled").write_text("deb http://no.example/ x main\n")
    (apt / "sources.list").write_text(f"deb {MIRROR} trixie main\n")
    assert [uri for uri, _ in _host_apt_uris(apt)] == [
        MIRROR,
        "http://a.example/debian",
        "http://b.example/debian",
    ]


def test_deb822_format(apt: Path) -> None:
    (apt / "sources.list.d/debian.sources").write_text(DEB822)
    assert _host_apt_uris(apt) == [
        (MIRROR, "trixie"),
        (MIRROR, "trixie-updates"),
        ("http://second.example/debian", "trixie"),
        ("http://second.example/debian", "trixie-updates"),
        (SECURITY, "trixie-security"),
    ]


def test_no_apt_configuration_at_all(tmp_path: Path) -> None:
    assert _host_apt_uris(tmp_path / "missing") == []


def test_sources_from_the_host_with_security(apt: Path) -> None:
    (apt / "sources.list.d/debian.sources").write_text(DEB822)
    assert apt_sources(config(), apt) == (
        AptSource(MIRROR, "trixie"),
        AptSource(MIRROR, "trixie-updates"),
        AptSource(SECURITY, "trixie-security"),
    )


def test_security_source_is_found_even_when_listed_first(apt: Path) -> None:
    (apt / "sources.list").write_text(
        f"deb {SECURITY} bookworm-security main\ndeb {MIRROR} bookworm main\n"
    )
    # A bookworm host building a trixie image: the URIs are reused, the suites are the image's.
    assert apt_sources(config("trixie"), apt) == (
        AptSource(MIRROR, "trixie"),
        AptSource(MIRROR, "trixie-updates"),
        AptSource(SECURITY, "trixie-security"),
    )


def test_host_without_security_source(apt: Path) -> None:
    (apt / "sources.list").write_text(f"deb {MIRROR} trixie main\n")
    assert apt_sources(config(), apt) == (
        AptSource(MIRROR, "trixie"),
        AptSource(MIRROR, "trixie-updates"),
    )


@pytest.mark.parametrize("suite", ["sid", "unstable", "experimental"])
def test_unstable_suites_have_no_updates_or_security(apt: Path, suite: str) -> None:
    (apt / "sources.list").write_text(ONE_LINE)
    assert apt_sources(config(suite), apt) == (AptSource(MIRROR, suite),)


def test_berth_mirror_overrides_the_host(apt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (apt / "sources.list").write_text(ONE_LINE)
    monkeypatch.setenv("BERTH_MIRROR", "http://env.example/debian")
    assert apt_sources(config(), apt) == (
        AptSource("http://env.example/debian", "trixie"),
        AptSource("http://env.example/debian", "trixie-updates"),
        AptSource(SECURITY, "trixie-security"),
    )
    monkeypatch.setenv("BERTH_SECURITY_MIRROR", "http://env-security.example/debian-security")
    assert apt_sources(config(), apt)[2] == AptSource(
        "http://env-security.example/debian-security", "trixie-security"
    )


def test_image_mirror_overrides_environment_and_host(
    apt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (apt / "sources.list").write_text(ONE_LINE)
    monkeypatch.setenv("BERTH_MIRROR", "http://env.example/debian")
    sources = apt_sources(config(mirror="http://image.example/debian"), apt)
    assert [s.uri for s in sources] == [
        "http://image.example/debian",
        "http://image.example/debian",
        SECURITY,
    ]


def test_mirror_without_any_host_configuration(tmp_path: Path) -> None:
    sources = apt_sources(config(mirror=MIRROR), tmp_path / "no-apt")
    assert sources == (AptSource(MIRROR, "trixie"), AptSource(MIRROR, "trixie-updates"))
    assert sources[1].line() == f"deb {MIRROR} trixie-updates main"


def test_no_mirror_anywhere_is_an_error_with_a_hint(apt: Path) -> None:
    # Only a security source is not enough: it does not carry the suite itself.
    (apt / "sources.list").write_text(f"deb {SECURITY} trixie-security main\n")
    with pytest.raises(BuildError, match="no Debian package mirror configured") as info:
        apt_sources(config(), apt)
    assert info.value.hint is not None
    assert "BERTH_MIRROR" in info.value.hint
    assert "mirror" in info.value.hint.replace("BERTH_MIRROR", "")


def test_third_party_host_sources_are_not_taken_for_the_debian_mirror(tmp_path: Path) -> None:
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list.d" / "docker.list").write_text(
        "deb [arch=amd64] http://vendor.example/linux/debian bookworm stable\n"
    )
    (apt / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n"
    )
    config = ImageConfig(name="t", path=tmp_path / "t.toml")
    sources = apt_sources(config, apt_dir=apt)
    assert sources[0].uri == "http://mirror.example/debian"
    assert sources[-1].uri == "http://security.example/debian-security"


@pytest.mark.parametrize("name", ["sources.list", "sources.list.d/debian.sources"])
def test_a_host_apt_source_that_is_not_utf8_is_a_build_error_naming_it(
    apt: Path, name: str
) -> None:
    (apt / name).write_bytes(b"deb http://mirror.example/d\xe9bian trixie main\n")
    with pytest.raises(BuildError, match=f"^{apt / name}: not UTF-8 text \\(byte 27\\)"):
        _host_apt_uris(apt)
