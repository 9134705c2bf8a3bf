"""Overlays: templates, .modes, symlinks, and never writing through a hard link into the cache."""

from __future__ import annotations

import os
import re
import socket
import stat
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from builder.errors import ConfigError
from builder.overlay import (
    apply_overlay,
    host_path,
    install_agent,
    install_file,
    render_template,
    replace_file,
)
from tests.support import REPO


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A tiny image tree with its own account databases (uids unlike the host's)."""
    root = tmp_path / "tree"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\nberth:x:4242:4343::/home/berth:/bin/sh\n"
    )
    (root / "etc/group").write_text("root:x:0:\nberth:x:4343:\nwheel:x:4444:berth\n")
    return root


@pytest.fixture
def overlay(tmp_path: Path) -> Path:
    directory = tmp_path / "overlay"
    directory.mkdir()
    return directory


def put(overlay: Path, rel: str, text: str, mode: int = 0o644) -> Path:
    path = overlay / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_files_directories_and_default_modes(overlay: Path, tree: Path) -> None:
    put(overlay, "etc/motd", "hello\n", 0o600)
    put(overlay, "usr/bin/tool", "#!/bin/sh\n", 0o700)
    installed = apply_overlay(overlay, tree, {})
    assert installed == ["/etc", "/etc/motd", "/usr", "/usr/bin", "/usr/bin/tool"]
    assert (tree / "etc/motd").read_text() == "hello\n"
    # Git keeps no modes but the executable bit: everything else is normalised.
    assert stat.S_IMODE((tree / "etc/motd").stat().st_mode) == 0o644
    assert stat.S_IMODE((tree / "usr/bin/tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((tree / "usr/bin").stat().st_mode) == 0o755
    assert (tree / "etc/motd").stat().st_uid == 0


def test_missing_overlay_directory(tmp_path: Path, tree: Path) -> None:
    with pytest.raises(
        ConfigError, match=re.escape(f"overlay directory {tmp_path / 'nope'} does not exist")
    ):
        apply_overlay(tmp_path / "nope", tree, {})


def test_j2_templates_are_rendered_and_lose_the_suffix(overlay: Path, tree: Path) -> None:
    put(overlay, "etc/hostname.j2", "{{ name }}-{{ version }}\n")
    put(overlay, "etc/raw.txt", "{{ not_a_template }}\n")
    installed = apply_overlay(overlay, tree, {"name": "berth", "version": "1.2.3"})
    assert "/etc/hostname" in installed
    assert "/etc/hostname.j2" not in installed
    assert (tree / "etc/hostname").read_text() == "berth-1.2.3\n"  # trailing newline kept
    assert not (tree / "etc/hostname.j2").exists()
    assert (tree / "etc/raw.txt").read_text() == "{{ not_a_template }}\n"


def test_undefined_variable_names_template_and_variable(overlay: Path, tree: Path) -> None:
    template = put(overlay, "etc/issue.j2", "line one\nwelcome to {{ missing_var }}\n")
    with pytest.raises(ConfigError) as info:
        apply_overlay(overlay, tree, {"other": "x"})
    message = str(info.value)
    assert str(template) in message
    assert "missing_var" in message
    assert not (tree / "etc/issue").exists()


def test_undefined_variable_in_condition_is_an_error_too(tmp_path: Path) -> None:
    template = put(tmp_path, "t.j2", "{% if flag %}yes{% endif %}\n")
    with pytest.raises(ConfigError, match=r"t\.j2: undefined variable in template: .*'flag'"):
        render_template(template, {})


def test_a_template_that_is_not_utf8_names_its_file(tmp_path: Path) -> None:
    template = tmp_path / "t.j2"
    template.write_bytes(b"ok {{ x }} \xff\n")
    with pytest.raises(ConfigError, match=re.escape(f"{template}: not UTF-8 text (byte 11)")):
        render_template(template, {"x": 1})


def test_a_template_that_fails_while_rendering_names_its_file(tmp_path: Path) -> None:
    template = put(tmp_path, "t.j2", "{{ x | int(base=99) }}{{ y.z() }}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{template}: ")):
        render_template(template, {"x": "1", "y": {"z": None}})


@pytest.mark.parametrize("value", ['a"b', "back\\slash", "new\nline", "100%", "ünï"])
def test_the_toml_filter_writes_a_value_that_reads_back_as_itself(
    tmp_path: Path, value: str
) -> None:
    template = put(tmp_path, "t.toml.j2", "[t]\nk = {{ v | toml }}\nl = [{{ v | toml }}]\n")
    assert tomllib.loads(render_template(template, {"v": value})) == {
        "t": {"k": value, "l": [value]}
    }


def test_the_unit_filter_escapes_specifiers_quotes_and_backslashes(tmp_path: Path) -> None:
    template = put(tmp_path, "u.j2", "Environment=X={{ v | unit }}\n")
    assert render_template(template, {"v": '50% "a\\b"'}) == ('Environment=X="50%% \\"a\\\\b\\""\n')
    with pytest.raises(ConfigError, match=r"u\.j2: template cannot be rendered: ValueError: .*"):
        render_template(template, {"v": "two\nlines"})


def test_a_template_that_is_not_utf8_is_refused_naming_it(tmp_path: Path) -> None:
    # Found by tests/test_fuzz_builder.py: read_text() raised UnicodeDecodeError.
    template = tmp_path / "t.j2"
    template.write_bytes(b"Hello \xff {{ name }}\n")
    with pytest.raises(ConfigError, match=r"t\.j2: not UTF-8 text \(byte 6\)"):
        render_template(template, {"name": "x"})


def test_a_template_nested_too_deeply_is_refused_naming_it(tmp_path: Path) -> None:
    # Found by tests/test_fuzz_builder.py: jinja2's parser raised RecursionError.
    template = put(tmp_path, "t.j2", "{{ " + "[" * 1000 + " }}")
    with pytest.raises(ConfigError, match=r"t\.j2: template syntax error: nested too deeply"):
        render_template(template, {})


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("{{ 0/0 }}", "ZeroDivisionError: division by zero"),
        ("{% if flag %}{{ 0|A }}{% endif %}", "TemplateRuntimeError: No filter named 'A'"),
        ("{{ name + 1 }}", "TypeError: "),
    ],
)
def test_a_template_that_fails_to_render_is_refused_naming_it(
    tmp_path: Path, text: str, error: str
) -> None:
    # Found by tests/test_fuzz_builder.py: these escaped render_template.
    template = put(tmp_path, "t.j2", text)
    with pytest.raises(
        ConfigError, match=rf"t\.j2: template cannot be rendered: {re.escape(error)}"
    ):
        render_template(template, {"name": "berth", "flag": True})


def test_syntax_error_names_file_and_line(overlay: Path, tree: Path) -> None:
    template = put(overlay, "etc/broken.j2", "ok\nok\n{% if x %}\nnever closed\n")
    with pytest.raises(ConfigError, match="template syntax error") as info:
        apply_overlay(overlay, tree, {"x": True})
    assert re.search(re.escape(str(template)) + r":\d+:", str(info.value))
    template2 = put(overlay, "etc/broken.j2", "ok\nok\n{{ x + }}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{template2}:3: template syntax error")):
        render_template(template2, {"x": 1})


def test_modes_file_sets_mode_and_owner_from_the_tree(overlay: Path, tree: Path) -> None:
    put(overlay, "etc/secret", "s\n")
    put(overlay, "home/berth/.profile.j2", "export USER={{ user }}\n")
    put(
        overlay,
        ".modes",
        "# comment line\n"
        "\n"
        "/etc/secret 0600 berth wheel   # trailing comment\n"
        "/home/berth/ 0750 berth berth\n"
        "/home/berth/.profile 0640 berth berth\n",
    )
    installed = apply_overlay(overlay, tree, {"user": "berth"})
    assert "/.modes" not in installed
    assert not (tree / ".modes").exists()
    secret = (tree / "etc/secret").stat()
    assert (stat.S_IMODE(secret.st_mode), secret.st_uid, secret.st_gid) == (0o600, 4242, 4444)
    home = (tree / "home/berth").stat()
    assert (stat.S_IMODE(home.st_mode), home.st_uid, home.st_gid) == (0o750, 4242, 4343)
    profile = (tree / "home/berth/.profile").stat()
    assert (stat.S_IMODE(profile.st_mode), profile.st_uid) == (0o640, 4242)


def test_modes_can_name_files_already_in_the_tree(overlay: Path, tree: Path) -> None:
    (tree / "etc/existing").write_text("from the packages\n")
    put(overlay, ".modes", "/etc/existing 4755 root root\n")
    apply_overlay(overlay, tree, {})
    assert stat.S_IMODE((tree / "etc/existing").stat().st_mode) == 0o4755


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("etc/secret 0600 root root", "expected '/path MODE USER GROUP'"),
        ("/etc/secret 0600 root", "expected '/path MODE USER GROUP'"),
        ("/etc/secret 0600 root root extra", "expected '/path MODE USER GROUP'"),
        ("/etc/secret 0689 root root", "mode '0689' is not an octal number"),
        ("/etc/secret rw root root", "mode 'rw' is not an octal number"),
        ("/etc/secret 17777 root root", "mode '17777' is out of range"),
        # Found by tests/test_fuzz_builder.py: int("-1", 8) is -1, which chmod made 07777.
        ("/etc/secret -1 root root", "mode '-1' is not an octal number"),
        ("/etc/secret 0o600 root root", "mode '0o600' is not an octal number"),
        # Found by tests/test_fuzz_builder.py: os.readlink raised ValueError on the NUL.
        ("/etc/sec\x00ret 0600 root root", "expected a path without NUL characters"),
    ],
)
def test_bad_modes_lines_are_rejected_with_file_and_line(
    overlay: Path, tree: Path, line: str, complaint: str
) -> None:
    put(overlay, "etc/secret", "s\n")
    modes = put(overlay, ".modes", f"# header\n/etc/secret 0600 root root\n{line}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{modes}:3: {complaint}")):
        apply_overlay(overlay, tree, {})


def test_modes_path_that_does_not_exist(overlay: Path, tree: Path) -> None:
    modes = put(overlay, ".modes", "/etc/absent 0600 root root\n")
    with pytest.raises(ConfigError, match=re.escape(f"{modes}: /etc/absent: no such file")):
        apply_overlay(overlay, tree, {})


@pytest.mark.parametrize(
    ("owner", "complaint"),
    [("nobody root", "user 'nobody' does not exist"), ("root nogroup", "group 'nogroup'")],
)
def test_modes_owner_must_exist_in_the_image(
    overlay: Path, tree: Path, owner: str, complaint: str
) -> None:
    put(overlay, "etc/secret", "s\n")
    modes = put(overlay, ".modes", f"/etc/secret 0600 {owner}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{modes}: /etc/secret: {complaint}")):
        apply_overlay(overlay, tree, {})


def test_symlinks_are_copied_as_symlinks(overlay: Path, tree: Path) -> None:
    put(overlay, "etc/real.conf", "real\n")
    (overlay / "etc/link.conf").symlink_to("real.conf")
    (overlay / "etc/dangling").symlink_to("/does/not/exist")
    (overlay / "etc/dirlink").symlink_to("/usr/lib")
    # What the overlay replaces: a file, and a directory, both become links.
    (tree / "etc/link.conf").write_text("old file\n")
    (tree / "etc/dirlink").mkdir()
    (tree / "etc/dirlink/inner").write_text("x")
    installed = apply_overlay(overlay, tree, {})
    assert {"/etc/link.conf", "/etc/dangling", "/etc/dirlink"} <= set(installed)
    assert os.readlink(tree / "etc/link.conf") == "real.conf"
    assert (tree / "etc/link.conf").read_text() == "real\n"
    assert os.readlink(tree / "etc/dangling") == "/does/not/exist"
    assert os.readlink(tree / "etc/dirlink") == "/usr/lib"


def test_overlay_directory_over_a_file_in_the_image_is_an_error(overlay: Path, tree: Path) -> None:
    (overlay / "etc/conf.d").mkdir(parents=True)
    (tree / "etc/conf.d").write_text("a file\n")
    with pytest.raises(ConfigError, match=r"is a directory, but /etc/conf\.d in the image is not"):
        apply_overlay(overlay, tree, {})


def test_replace_file_breaks_hard_links(tmp_path: Path) -> None:
    cache = tmp_path / "cache-file"
    cache.write_text("cached\n")
    copy = tmp_path / "tree-file"
    os.link(cache, copy)
    assert cache.stat().st_ino == copy.stat().st_ino
    replace_file(copy, b"new\n", 0o600)
    assert cache.read_text() == "cached\n"
    assert copy.read_bytes() == b"new\n"
    assert cache.stat().st_ino != copy.stat().st_ino
    assert cache.stat().st_nlink == 1
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600


def test_apply_overlay_leaves_a_hard_linked_cache_alone(overlay: Path, tree: Path) -> None:
    cache = tree.parent / "cache-motd"
    cache.write_text("cached\n")
    os.link(cache, tree / "etc/motd")
    put(overlay, "etc/motd", "overlaid\n")
    apply_overlay(overlay, tree, {})
    assert (tree / "etc/motd").read_text() == "overlaid\n"
    assert cache.read_text() == "cached\n"


def test_replace_file_replaces_symlinks_and_directories(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("keep\n")
    link = tmp_path / "link"
    link.symlink_to(target)
    replace_file(link, b"file now\n")
    assert not link.is_symlink()
    assert target.read_text() == "keep\n"
    directory = tmp_path / "dir"
    (directory / "sub").mkdir(parents=True)
    replace_file(directory, b"was a directory\n")
    assert directory.read_bytes() == b"was a directory\n"
    replace_file(tmp_path / "new/parents/file", b"x", 0o755)
    assert stat.S_IMODE((tmp_path / "new/parents/file").stat().st_mode) == 0o755


def test_install_agent(tmp_path: Path, tree: Path) -> None:
    updater = tmp_path / "updater"
    put(updater, "__init__.py", "")
    put(updater, "agent.py", "print('agent')\n")
    put(updater, "sub/mod.py", "x = 1\n")
    put(updater, "__pycache__/agent.cpython-311.py", "stale\n")
    put(updater, "notes.txt", "not python\n")
    put(updater, "units/berth-update.service", "[Unit]\n")
    put(updater, "bin/berth-update", "#!/usr/bin/python3\n", 0o644)
    stale = tree / "usr/lib/python3/dist-packages/updater/old.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("old\n")
    install_agent(updater, tree)
    package = tree / "usr/lib/python3/dist-packages/updater"
    assert sorted(str(p.relative_to(package)) for p in package.rglob("*") if p.is_file()) == [
        "__init__.py",
        "agent.py",
        "sub/mod.py",
    ]
    unit = tree / "usr/lib/systemd/system/berth-update.service"
    assert unit.read_text() == "[Unit]\n"
    command = tree / "usr/bin/berth-update"
    assert stat.S_IMODE(command.stat().st_mode) == 0o755


# Escapes from the tree: the build runs as root, so nothing an overlay, an extra tree or a later
# stage writes may land outside the tree, whatever links the tree holds.


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A directory of the build host outside the tree, with a file nothing may touch."""
    directory = tmp_path / "host"
    directory.mkdir()
    (directory / "victim").write_text("host file\n")
    os.chmod(directory / "victim", 0o644)
    return directory


def untouched(host: Path) -> bool:
    victim = host / "victim"
    return (
        sorted(p.name for p in host.iterdir()) == ["victim"]
        and victim.read_text() == "host file\n"
        and stat.S_IMODE(victim.stat().st_mode) == 0o644
    )


@pytest.mark.parametrize(
    "path", ["/etc/../../host/victim", "/etc/./passwd", "/etc//passwd", "/../etc/passwd"]
)
def test_modes_paths_must_be_normalised(overlay: Path, tree: Path, host: Path, path: str) -> None:
    modes = put(overlay, ".modes", f"# header\n{path} 0777 root root\n")
    with pytest.raises(ConfigError) as info:
        apply_overlay(overlay, tree, {})
    assert str(info.value) == (
        f"{modes}:2: expected a normalised absolute path inside the image (no '.', '..' or "
        f"'//'), got {path!r}"
    )
    assert untouched(host)


def test_modes_through_a_link_that_climbs_out_is_refused(
    overlay: Path, tree: Path, host: Path
) -> None:
    # From /etc, one `..` reaches the image's root; the rest would climb out on the build host.
    (tree / "etc/evil").symlink_to("../../host")
    modes = put(overlay, ".modes", "/etc/evil/victim 0777 root root\n")
    with pytest.raises(ConfigError) as info:
        apply_overlay(overlay, tree, {})
    assert str(info.value) == (
        f"{modes}:1: /etc/evil/victim: expected a path inside the image tree, but "
        "/etc/evil -> ../../host climbs above its root"
    )
    assert untouched(host)


def test_modes_through_an_absolute_link_stays_in_the_tree(
    overlay: Path, tree: Path, host: Path
) -> None:
    # An absolute link names the image's own path: /<host> inside the tree, not the host's.
    (tree / "etc/abs").symlink_to(host)
    put(overlay, ".modes", "/etc/abs/victim 0600 berth berth\n")
    with pytest.raises(ConfigError, match="/etc/abs/victim: no such file in the image"):
        apply_overlay(overlay, tree, {})
    inside = tree / str(host).lstrip("/") / "victim"
    inside.parent.mkdir(parents=True)
    inside.write_text("the image's\n")
    apply_overlay(overlay, tree, {})
    assert (stat.S_IMODE(inside.stat().st_mode), inside.stat().st_uid) == (0o600, 4242)
    assert untouched(host)


def test_modes_file_must_be_a_file_of_the_overlay(overlay: Path, tree: Path, host: Path) -> None:
    # Read through a link, .modes would quote a host file in its errors.
    (overlay / ".modes").symlink_to(host / "victim")
    with pytest.raises(ConfigError, match="expected a regular file, not a symbolic link"):
        apply_overlay(overlay, tree, {})
    (overlay / ".modes").unlink()
    (overlay / ".modes").write_bytes(b"/etc/passwd 0644 root root # caf\xe9\n")
    with pytest.raises(ConfigError, match=r"\.modes: expected UTF-8 text \(byte 32 is not\)"):
        apply_overlay(overlay, tree, {})


def test_modes_path_given_twice_names_both_lines(overlay: Path, tree: Path) -> None:
    modes = put(overlay, ".modes", "/etc/passwd 0644 root root\n\n/etc/passwd/ 0600 root root\n")
    with pytest.raises(ConfigError) as info:
        apply_overlay(overlay, tree, {})
    assert str(info.value) == (
        f"{modes}:3: expected each path once, but /etc/passwd is already given on line 1"
    )


def test_modes_owners_are_read_from_the_tree_through_its_own_links(
    overlay: Path, tree: Path
) -> None:
    # An absolute link to /etc/passwd-like files must not make the build read the host's.
    real = tree / "usr/share/base/passwd"
    real.parent.mkdir(parents=True)
    (tree / "etc/passwd").rename(real)
    (tree / "etc/passwd").symlink_to("/usr/share/base/passwd")
    put(overlay, "etc/secret", "s\n")
    put(overlay, ".modes", "/etc/secret 0600 berth root\n")
    apply_overlay(overlay, tree, {})
    assert (tree / "etc/secret").stat().st_uid == 4242


def test_overlay_links_that_climb_out_are_refused(overlay: Path, tree: Path) -> None:
    (overlay / "etc").mkdir()
    (overlay / "etc/fine").symlink_to("../usr/lib/os-release")
    (overlay / "etc/absolute").symlink_to("/usr/lib/os-release")  # the image's own
    apply_overlay(overlay, tree, {})
    (overlay / "etc/out").symlink_to("../../../host/victim")
    with pytest.raises(ConfigError) as info:
        apply_overlay(overlay, tree, {})
    assert str(info.value) == (
        f"{overlay / 'etc/out'}: a symbolic link to ../../../host/victim: /etc/../../../host/"
        "victim: expected a path inside the image tree, but the path climbs above its root"
    )
    assert not (tree / "etc/out").is_symlink()


def test_extra_tree_under_an_image_link_pointing_outside_is_refused(
    overlay: Path, tree: Path, host: Path
) -> None:
    (tree / "var").mkdir()
    (tree / "var/run").symlink_to(host)  # as Debian's /var/run -> /run, but to the host's eye
    put(overlay, "var/run/victim", "overwritten\n")
    with pytest.raises(ConfigError) as info:
        apply_overlay(overlay, tree, {})
    assert str(info.value) == (
        f"{overlay / 'var/run'}: is a directory, but /var/run in the image is not: it is a "
        f"symbolic link to {host}; expected a directory there (put the files under the link's "
        "target instead)"
    )
    assert untouched(host)


@pytest.mark.parametrize(
    ("make", "kind"),
    [(os.mkfifo, "named pipe"), (lambda p: socket.socket(socket.AF_UNIX).bind(str(p)), "socket")],
)
def test_extra_tree_special_files_are_refused(
    overlay: Path, tree: Path, make: Callable[[Path], object], kind: str
) -> None:
    # Reading a named pipe would hang the build; a device could be endless.
    (overlay / "etc").mkdir()
    make(overlay / "etc/special")
    with pytest.raises(ConfigError) as info:
        apply_overlay(overlay, tree, {})
    assert str(info.value) == (
        f"{overlay / 'etc/special'}: expected a regular file, a directory or a symbolic link, "
        f"not a {kind}"
    )


def test_later_writes_follow_links_an_extra_tree_left_inside_the_tree(
    tmp_path: Path, overlay: Path, tree: Path, host: Path
) -> None:
    # An extra tree may make /usr/share/berth or /usr/lib/python3 an absolute link: what the
    # build writes there afterwards lands where the image will see it, never on the host.
    (overlay / "usr/share").mkdir(parents=True)
    (overlay / "usr/share/berth").symlink_to(host)
    (overlay / "usr/lib").mkdir(parents=True)
    (overlay / "usr/lib/python3").symlink_to(host)
    apply_overlay(overlay, tree, {})
    install_file(tree, "/usr/share/berth/tuf/root.json", b"{}")
    updater = tmp_path / "updater"
    put(updater, "__init__.py", "")
    install_agent(updater, tree)
    inside = tree / str(host).lstrip("/")
    assert (inside / "tuf/root.json").read_bytes() == b"{}"
    assert (inside / "dist-packages/updater/__init__.py").exists()
    assert untouched(host)


def test_host_path_resolves_inside_the_tree(tree: Path) -> None:
    (tree / "usr/lib").mkdir(parents=True)
    (tree / "lib").symlink_to("usr/lib")
    (tree / "etc/alt").symlink_to("/lib")
    assert host_path(tree, "/etc/alt/x", "here") == tree / "usr/lib/x"
    assert host_path(tree, "/etc/alt", "here") == tree / "etc/alt"  # the link itself
    assert host_path(tree, "/etc/alt", "here", follow=True) == tree / "usr/lib"
    (tree / "etc/loop").symlink_to("loop")
    with pytest.raises(ConfigError, match="here: /etc/loop/x: too many levels of symbolic links"):
        host_path(tree, "/etc/loop/x", "here")


def test_the_container_storage_template_is_toml_podman_can_read() -> None:
    template = REPO / "overlays/containerhost/usr/share/containers/storage.conf.j2"
    store = "/usr/lib/containers/storage"
    doc = tomllib.loads(render_template(template, {"preload_store": store}))
    assert doc["storage"]["options"]["additionalimagestores"] == [store]
    assert "options" in tomllib.loads(render_template(template, {"preload_store": ""}))["storage"]
