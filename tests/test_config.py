"""Image definitions: the shipped images, `extends` merging, and the error messages."""

from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from builder.config import (
    DEFAULT_COMPRESSION,
    DEFAULT_FORMATS,
    Compression,
    ImageConfig,
    OutputFormat,
    Partitions,
    _verity_hash_size,
    list_images,
    load_image,
)
from builder.errors import ConfigError
from tests.support import REPO

MiB = 1024**2
GiB = 1024**3


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """An images/ directory beside an overlays/ directory holding `base` and `extra`."""
    for overlay in ("base", "extra"):
        (tmp_path / "overlays" / overlay).mkdir(parents=True)
    directory = tmp_path / "images"
    directory.mkdir()
    return directory


def write(images: Path, name: str, text: str) -> Path:
    path = images / f"{name}.toml"
    path.write_text(text)
    return path


def error_of(images: Path, name: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_image(name, images)
    return str(info.value)


# The shipped images


def test_shipped_images_are_listed() -> None:
    assert {"base", "containerhost", "docker"} <= set(list_images(REPO / "images"))


def test_shipped_base() -> None:
    base = load_image("base", REPO / "images")
    assert base.name == "base"
    assert base.suite == "trixie"
    assert base.mirror is None
    assert base.extends == ()
    assert base.overlays == ("base",)
    assert {"linux-image-amd64", "systemd", "systemd-boot", "python3-tuf"} <= set(base.packages)
    # The last console= is /dev/console; the VM tests read the serial port.
    consoles = [word for word in base.cmdline if word.startswith("console=")]
    assert consoles[-1].startswith("console=ttyS0")
    assert base.partitions == Partitions()
    assert base.formats == (OutputFormat.RAW, OutputFormat.QCOW2)
    assert base.update.channel == "stable"
    assert base.update.url == ""
    assert base.compression == DEFAULT_COMPRESSION


def test_shipped_containerhost_inherits_base() -> None:
    base = load_image("base", REPO / "images")
    host = load_image("containerhost", REPO / "images")
    assert host.extends == ("base",)
    assert host.packages[: len(base.packages)] == base.packages
    assert {"podman", "crun", "netavark", "nftables", "podman-docker"} <= set(host.packages)
    assert len(set(host.packages)) == len(host.packages)
    assert host.overlays == ("base", "containers", "containerhost")
    assert host.cmdline == base.cmdline
    assert host.partitions == base.partitions
    assert host.preload == ()


def test_shipped_docker_variant() -> None:
    base = load_image("base", REPO / "images")
    docker = load_image("docker", REPO / "images")
    assert docker.extends == ("base",)
    assert docker.packages[: len(base.packages)] == base.packages
    assert {"docker.io", "docker-cli", "containerd", "runc"} <= set(docker.packages)
    assert "podman" not in docker.packages
    assert docker.overlays == ("base", "containers", "docker")


def test_load_by_path(images: Path) -> None:
    path = write(images, "one", 'description = "by path"')
    config = load_image(str(path), images)
    assert config.name == "one"
    assert config.path == path
    assert config.description == "by path"


def test_defaults(images: Path) -> None:
    write(images, "empty", "")
    config = load_image("empty", images)
    assert config == ImageConfig(name="empty", path=images / "empty.toml")
    assert config.formats == DEFAULT_FORMATS
    assert config.partitions == Partitions(
        esp=1 * GiB, root=2 * GiB, verity=128 * MiB, state=512 * MiB
    )
    assert dict(config.variables) == {}
    hash(config)


def test_every_field_is_read(images: Path) -> None:
    write(
        images,
        "full",
        """
        description = "all keys"
        suite = "forky"
        mirror = "http://mirror.example/debian"
        packages = ["a1", "b2+x"]
        overlays = ["base", "extra"]
        cmdline = ["quiet", "console=ttyS0"]
        compression = "zstd"
        formats = ["qcow2"]
        [partitions]
        esp = "512MiB"
        root = "4GiB"
        verity = 67108864
        state = "1g"
        [update]
        channel = "beta-2"
        url = "https://updates.example/berth"
        [variables]
        motd = "hello"
        """,
    )
    config = load_image("full", images)
    assert config.description == "all keys"
    assert config.suite == "forky"
    assert config.mirror == "http://mirror.example/debian"
    assert config.packages == ("a1", "b2+x")
    assert config.overlays == ("base", "extra")
    assert config.cmdline == ("quiet", "console=ttyS0")
    assert config.compression is Compression.ZSTD
    assert config.formats == (OutputFormat.QCOW2,)
    assert config.partitions == Partitions(esp=512 * MiB, root=4 * GiB, verity=64 * MiB, state=GiB)
    assert config.update.channel == "beta-2"
    assert config.update.url == "https://updates.example/berth"
    assert dict(config.variables) == {"motd": "hello"}


# Merging along extends


def test_child_applies_over_parent(images: Path) -> None:
    write(
        images,
        "parent",
        """
        description = "parent"
        packages = ["aa", "bb", "cc"]
        overlays = ["base"]
        cmdline = ["quiet"]
        formats = ["raw", "qcow2"]
        [partitions]
        esp = "200M"
        root = "1G"
        [update]
        channel = "beta"
        url = "https://updates.example/"
        [variables]
        a = "parent"
        b = "parent"
        """,
    )
    write(
        images,
        "child",
        """
        extends = "parent"
        packages = ["dd", "aa", "-bb"]
        overlays = ["extra", "base"]
        cmdline = ["quiet", "loglevel=4"]
        formats = ["qcow2"]
        [partitions]
        root = "3G"
        [update]
        channel = "alpha"
        [variables]
        b = "child"
        """,
    )
    child = load_image("child", images)
    assert child.description == "parent"
    assert child.packages == ("aa", "cc", "dd")
    assert child.overlays == ("base", "extra")
    assert child.cmdline == ("quiet", "loglevel=4")
    assert child.formats == (OutputFormat.QCOW2,)
    assert child.partitions == Partitions(esp=200 * MiB, root=3 * GiB)
    assert child.update.channel == "alpha"
    assert child.update.url == "https://updates.example/"
    assert dict(child.variables) == {"a": "parent", "b": "child"}
    assert child.extends == ("parent",)
    assert child.name == "child"


def test_extends_chain_is_nearest_first(images: Path) -> None:
    write(images, "a", 'packages = ["from-a"]')
    write(images, "b", 'extends = "a"\npackages = ["from-b"]')
    write(images, "c", 'extends = "b"\npackages = ["from-c", "-from-a"]')
    config = load_image("c", images)
    assert config.extends == ("b", "a")
    assert config.packages == ("from-b", "from-c")


# Errors: each names the file and the key


def test_unknown_key_suggests_close_match(images: Path) -> None:
    write(images, "foo", 'pakages = ["podman"]')
    message = error_of(images, "foo")
    assert "images/foo.toml" in message
    assert "unknown key 'pakages'" in message
    assert "did you mean 'packages'?" in message


def test_unknown_key_in_table_suggests_dotted_key(images: Path) -> None:
    write(images, "foo", '[partitions]\nespp = "1G"')
    message = error_of(images, "foo")
    assert "images/foo.toml" in message
    assert "'partitions.espp'" in message
    assert "did you mean 'partitions.esp'?" in message


def test_unknown_key_without_close_match_lists_keys(images: Path) -> None:
    write(images, "foo", 'zzzzzz = "x"')
    message = error_of(images, "foo")
    assert "images/foo.toml" in message
    assert "'zzzzzz'" in message
    assert "'packages'" in message


def test_wrong_type_names_key_and_types(images: Path) -> None:
    write(images, "foo", 'packages = "podman"')
    message = error_of(images, "foo")
    assert message == (
        "images/foo.toml: key 'packages': expected a list of strings, got a string: \"podman\""
    )


def test_wrong_type_in_table(images: Path) -> None:
    write(images, "foo", "[update]\nchannel = 3")
    message = error_of(images, "foo")
    assert message == "images/foo.toml: key 'update.channel': expected a string, got an integer: 3"


def test_table_given_as_scalar(images: Path) -> None:
    write(images, "foo", 'partitions = "big"')
    message = error_of(images, "foo")
    assert "images/foo.toml: key 'partitions'" in message
    assert "a table" in message


def test_bad_size(images: Path) -> None:
    write(images, "foo", "[partitions]\nesp = 12.5")
    message = error_of(images, "foo")
    assert message.startswith(
        'images/foo.toml: key \'partitions.esp\': expected a size like "1G" or "512M"'
    )
    assert message.endswith("got 12.5")


@pytest.mark.parametrize("value", ['"1.5G"', '"1GB"', '"big"', '"1X"', "true", '"-1G"'])
def test_bad_size_strings(images: Path, value: str) -> None:
    write(images, "foo", f"[partitions]\nroot = {value}")
    message = error_of(images, "foo")
    assert "images/foo.toml: key 'partitions.root'" in message
    assert "expected a size like" in message


def test_size_must_be_whole_mib(images: Path) -> None:
    write(images, "foo", "[partitions]\nroot = 1000000000")
    message = error_of(images, "foo")
    assert "images/foo.toml: key 'partitions.root'" in message
    assert "whole number of MiB" in message
    assert "1000000000" in message


def test_esp_too_small(images: Path) -> None:
    write(images, "foo", '[partitions]\nesp = "64M"')
    message = error_of(images, "foo")
    assert message == "images/foo.toml: key 'partitions.esp': expected at least 100M, got \"64M\""


def test_verity_too_small_for_root(images: Path) -> None:
    write(images, "foo", '[partitions]\nroot = "16G"')
    message = error_of(images, "foo")
    assert "images/foo.toml: key 'partitions.verity'" in message
    assert "16G root slot" in message
    assert "got 128M" in message


def test_verity_default_fits_a_15g_root(images: Path) -> None:
    write(images, "foo", '[partitions]\nroot = "15G"')
    assert load_image("foo", images).partitions.root == 15 * GiB


def test_extends_cycle(images: Path) -> None:
    write(images, "a", 'extends = "b"')
    write(images, "b", 'extends = "a"')
    message = error_of(images, "a")
    assert "key 'extends'" in message
    assert "images/a.toml -> images/b.toml -> images/a.toml" in message


def test_extends_itself(images: Path) -> None:
    write(images, "a", 'extends = "a"')
    message = error_of(images, "a")
    assert "images/a.toml: key 'extends'" in message
    assert "images/a.toml -> images/a.toml" in message


def test_missing_parent(images: Path) -> None:
    write(images, "child", 'extends = "nope"')
    message = error_of(images, "child")
    assert message.startswith("images/child.toml: key 'extends':")
    assert '"nope"' in message
    assert "images/nope.toml" in message


def test_extends_with_file_suffix_is_rejected(images: Path) -> None:
    write(images, "base", "")
    write(images, "child", 'extends = "base.toml"')
    message = error_of(images, "child")
    assert "images/child.toml: key 'extends'" in message
    assert "without .toml" in message


def test_removing_a_package_no_parent_installs(images: Path) -> None:
    write(images, "parent", 'packages = ["aa"]')
    write(images, "child", 'extends = "parent"\npackages = ["-bb"]')
    message = error_of(images, "child")
    assert "images/child.toml: key 'packages'" in message
    assert '"-bb"' in message


def test_adding_and_removing_the_same_package(images: Path) -> None:
    write(images, "parent", 'packages = ["aa"]')
    write(images, "child", 'extends = "parent"\npackages = ["aa", "-aa"]')
    message = error_of(images, "child")
    assert "images/child.toml: key 'packages'" in message


@pytest.mark.parametrize("name", ["Podman", "p", "pod man", "-", "pod_man"])
def test_bad_package_name(images: Path, name: str) -> None:
    write(images, "foo", f'packages = ["{name}"]')
    message = error_of(images, "foo")
    assert "images/foo.toml: key 'packages'" in message
    assert "Debian package names" in message


def test_toml_syntax_error_names_file_and_line(images: Path) -> None:
    write(images, "bad", 'description = "ok"\n\npackages = [\n  "a" "b",\n]\n')
    message = error_of(images, "bad")
    assert re.match(r"images/bad\.toml:4:\d+: not valid TOML: ", message), message


def test_toml_error_at_end_of_file(images: Path) -> None:
    write(images, "bad", 'packages = ["a"')
    message = error_of(images, "bad")
    assert message.startswith("images/bad.toml")
    assert "not valid TOML" in message


def test_toml_nested_too_deeply(images: Path) -> None:
    # Found by tests/test_fuzz_builder.py: tomllib's RecursionError escaped.
    write(images, "bad", "description = " + "[" * 50_000 + "]" * 50_000)
    assert error_of(images, "bad") == "images/bad.toml: not valid TOML: nested too deeply"


def test_toml_integer_too_long(images: Path) -> None:
    # Found by tests/test_fuzz_builder.py: int()'s ValueError escaped through tomllib.
    write(images, "bad", "description = 1" + "0" * 5000)
    assert error_of(images, "bad").startswith("images/bad.toml: not valid TOML: Exceeds the limit")


def test_size_with_too_many_digits(images: Path) -> None:
    # Found by tests/test_fuzz_builder.py: int() raised ValueError on 5000 digits.
    write(images, "bad", f'[partitions]\nroot = "{"9" * 5000}M"')
    assert error_of(images, "bad").startswith(
        "images/bad.toml: key 'partitions.root': expected a size"
    )


def test_bad_format_name(images: Path) -> None:
    write(images, "foo", 'formats = ["raw", "qcow"]')
    with pytest.raises(ConfigError) as info:
        load_image("foo", images)
    assert str(info.value).startswith("images/foo.toml: key 'formats': expected one of")
    assert str(info.value).endswith('got "qcow"')
    assert info.value.hint == 'did you mean "qcow2"?'


def test_every_platform_format_is_accepted(images: Path) -> None:
    write(
        images, "foo", 'formats = ["raw.zst", "vmdk", "ova", "vhd", "gce", "qcow2", "raw", "ova"]'
    )
    config = load_image("foo", images)
    # In the order written, duplicates dropped.
    assert config.formats == (
        OutputFormat.RAW_ZST,
        OutputFormat.VMDK,
        OutputFormat.OVA,
        OutputFormat.VHD,
        OutputFormat.GCE,
        OutputFormat.QCOW2,
        OutputFormat.RAW,
    )


def test_format_error_lists_every_format(images: Path) -> None:
    write(images, "foo", 'formats = ["vhdx"]')
    with pytest.raises(ConfigError) as info:
        load_image("foo", images)
    message = str(info.value)
    assert message.startswith("images/foo.toml: key 'formats': expected one of")
    for name in ("raw", "qcow2", "vmdk", "ova", "vhd", "gce", "raw.zst"):
        assert f'"{name}"' in message
    assert message.endswith('got "vhdx"')
    assert info.value.hint == 'did you mean "vhd"?'


def test_empty_formats(images: Path) -> None:
    write(images, "foo", "formats = []")
    message = error_of(images, "foo")
    assert "images/foo.toml: key 'formats'" in message


def test_bad_compression(images: Path) -> None:
    write(images, "foo", 'compression = "gzip"')
    message = error_of(images, "foo")
    assert "images/foo.toml: key 'compression'" in message
    assert '"lz4hc"' in message


def test_missing_overlay_directory(images: Path) -> None:
    write(images, "foo", 'overlays = ["base", "nope"]')
    with pytest.raises(ConfigError) as info:
        load_image("foo", images)
    message = str(info.value)
    assert "images/foo.toml: key 'overlays'" in message
    assert "overlays/nope" in message
    assert info.value.hint is not None
    assert "base, extra" in info.value.hint


def test_overlay_name_cannot_escape(images: Path) -> None:
    write(images, "foo", 'overlays = ["../images"]')
    message = error_of(images, "foo")
    assert "images/foo.toml: key 'overlays'" in message


@pytest.mark.parametrize(
    ("key", "text"),
    [
        ("overlays", 'overlays = ["{}"]'),
        ("extends", 'extends = "{}"'),
        ("suite", 'suite = "{}"'),
    ],
)
def test_names_longer_than_a_file_name_are_refused(images: Path, key: str, text: str) -> None:
    # a name that becomes a path component: the file system's limit must not surface as OSError
    write(images, "foo", text.format("a" * 5000))
    message = error_of(images, "foo")
    assert f"images/foo.toml: key '{key}'" in message


@pytest.mark.parametrize("url", ["deb.example/debian", "ftp://x.example/", "http://", "file:rel"])
def test_bad_mirror(images: Path, url: str) -> None:
    write(images, "foo", f'mirror = "{url}"')
    message = error_of(images, "foo")
    assert "images/foo.toml: key 'mirror'" in message
    assert url in message


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('snapshot = "2026-12-01"', "snapshot"),
        ('snapshot = "20261301T000000Z"', "snapshot"),
        ('snapshot = "20261201T000000"', "snapshot"),
        ("snapshot = 20261201", "snapshot"),
        ('snapshot_mirror = "snapshots.example"', "snapshot_mirror"),
    ],
)
def test_bad_snapshot(images: Path, line: str, key: str) -> None:
    write(images, "foo", line)
    assert f"images/foo.toml: key '{key}'" in error_of(images, "foo")


def test_a_snapshot_is_inherited(images: Path) -> None:
    write(images, "foo", 'snapshot = "20261201T000000Z"\nsnapshot_mirror = "http://snap.example/"')
    write(images, "bar", 'extends = "foo"')
    bar = load_image("bar", images)
    assert (bar.snapshot, bar.snapshot_mirror) == ("20261201T000000Z", "http://snap.example/")


def test_file_mirror_is_accepted(images: Path) -> None:
    write(images, "foo", 'mirror = "file:///srv/mirror/debian"')
    assert load_image("foo", images).mirror == "file:///srv/mirror/debian"


# The agent's rule (updater.release.channel.CHANNEL_NAME): "-beta" and a 65-character name are
# refused by it, so the builder refuses them too.
@pytest.mark.parametrize("channel", ["Stable", "", "beta channel", "-beta", "b" * 65, 'a"b'])
def test_bad_channel(images: Path, channel: str) -> None:
    write(images, "foo", f"[update]\nchannel = {json.dumps(channel)}")
    message = error_of(images, "foo")
    assert "images/foo.toml: key 'update.channel'" in message


# ... and what the agent takes, the builder takes: "beta_1" was refused before, though every
# machine would have followed it.
@pytest.mark.parametrize("channel", ["beta_1", "beta.1", "stable"])
def test_a_channel_the_agent_takes_is_taken(images: Path, channel: str) -> None:
    write(images, "foo", f'[update]\nchannel = "{channel}"')
    assert load_image("foo", images).update.channel == channel


def test_bad_update_url(images: Path) -> None:
    write(images, "foo", '[update]\nurl = "updates.example"')
    message = error_of(images, "foo")
    assert "images/foo.toml: key 'update.url'" in message


@pytest.mark.parametrize("word", ["console=ttyS0 quiet", "", "roothash=abcd"])
def test_bad_cmdline_word(images: Path, word: str) -> None:
    write(images, "foo", f'cmdline = ["{word}"]')
    message = error_of(images, "foo")
    assert "images/foo.toml: key 'cmdline'" in message


def test_variables_must_be_strings_with_template_names(images: Path) -> None:
    write(images, "foo", "[variables]\ncount = 3")
    message = error_of(images, "foo")
    assert "images/foo.toml: key 'variables.count'" in message
    write(images, "bar", '[variables]\n"with-dash" = "x"')
    message = error_of(images, "bar")
    assert "images/bar.toml: key 'variables'" in message
    assert "with-dash" in message


def test_error_in_parent_names_the_parent(images: Path) -> None:
    write(images, "parent", 'suite = "Trixie"')
    write(images, "child", 'extends = "parent"')
    message = error_of(images, "child")
    assert "images/parent.toml: key 'suite'" in message


def test_unknown_image_lists_available(images: Path) -> None:
    write(images, "base", "")
    with pytest.raises(ConfigError) as info:
        load_image("nope", images)
    assert "images/nope.toml" in str(info.value)
    assert info.value.hint is not None
    assert "base" in info.value.hint


def test_list_images(images: Path) -> None:
    write(images, "zeta", "")
    write(images, "alpha", "")
    (images / "notes.txt").write_text("")
    assert list_images(images) == ["alpha", "zeta"]
    with pytest.raises(ConfigError):
        list_images(images / "missing")


@pytest.mark.parametrize("size", [64 * MiB, 513 * MiB])
def test_verity_size_estimate_matches_veritysetup(tmp_path: Path, size: int) -> None:
    data, tree = tmp_path / "data", tmp_path / "tree"
    with data.open("wb") as f:
        f.truncate(size)
    subprocess.run(["veritysetup", "format", data, tree], check=True, capture_output=True)
    assert _verity_hash_size(size) == tree.stat().st_size


# Preloaded container images


def _tar(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("oci-layout")
        data = b'{"imageLayoutVersion": "1.0.0"}'
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_preload_paths_are_relative_to_the_definition_and_merge(images: Path) -> None:
    web = _tar(images / "archives" / "web.tar")
    db = _tar(images.parent / "db.tar")
    write(images, "parent", 'preload = ["archives/web.tar"]')
    write(images, "child", f'extends = "parent"\npreload = ["../db.tar", "{web}"]')
    assert load_image("parent", images).preload == (web,)
    # Parents' archives first; the same archive named twice is loaded once.
    assert load_image("child", images).preload == (web, db)


def test_preload_missing_archive(images: Path) -> None:
    write(images, "foo", 'preload = ["web.tar"]')
    with pytest.raises(ConfigError) as info:
        load_image("foo", images)
    message = str(info.value)
    assert message.startswith("images/foo.toml: key 'preload': expected paths of container image")
    assert '"web.tar" (images/web.tar does not exist or is not a file)' in message
    assert info.value.hint is not None and "relative to the directory" in info.value.hint


def test_preload_not_an_archive(images: Path) -> None:
    (images / "web.tar").write_text("not a tar file\n")
    write(images, "foo", 'preload = ["web.tar"]')
    message = error_of(images, "foo")
    assert "key 'preload'" in message
    assert "images/web.tar is not a tar archive" in message


@pytest.mark.parametrize("value", ['"web.tar"', "[1]", '[""]'])
def test_preload_wrong_type(images: Path, value: str) -> None:
    write(images, "foo", f"preload = {value}")
    assert "images/foo.toml: key 'preload': expected" in error_of(images, "foo")
