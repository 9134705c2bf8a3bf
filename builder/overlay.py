"""Stage 2: overlays rendered onto the tree, and the update agent installed into /usr.

Each overlay is a directory `overlays/<name>/` mirroring the root tree. Files ending in `.j2` are
rendered with jinja2 in strict mode and lose the suffix. Git records neither owners nor most modes,
so everything is installed root:root, 0755 for directories and executables, 0644 otherwise, unless
the overlay's `.modes` file says otherwise, one line per path: `/etc/foo 0600 root root`.

The tree is a hard-linked copy of the cached root tree, so a file is always replaced (unlink, then
create), never written in place: writing in place would change the cache too.

The build runs as root, and the tree is full of absolute symlinks (`/var/run -> /run`) that name
the tree's own files but the host's to the kernel. So every path written into the tree goes
through `host_path`, which follows links the way the tree itself will (`updater.files`), and
nothing an overlay or an extra tree holds may lead out of it: a `..` that climbs above the root,
in a `.modes` path or in a link, is refused with the file, the line and what was expected.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from builder.errors import ConfigError
from builder.tomlwrite import toml_string
from updater.files import host_readlink, read_utf8, resolve_in_root

MODES_FILE = ".modes"


@dataclass(frozen=True)
class ModeEntry:
    mode: int
    user: str
    group: str
    where: str = ""  # "<overlay>/.modes:<line>", for messages


def host_path(tree: Path, path: str, where: str, *, follow: bool = False) -> Path:
    """The host path of image path `path`, its links followed inside `tree`.

    Absolute link targets start again at the tree's root, so the result is always inside `tree`
    and no directory of it is a link. With `follow` false a link as the last component is the
    result itself (to replace or chown it); with `follow` true it is followed too. A `..` that
    would climb above the root, in `path` or in a link on the way, is a ConfigError naming `where`:
    the kernel would stop it at the root, but nothing an overlay means goes there.
    """
    try:
        found = resolve_in_root(path, host_readlink(tree), follow=follow)
    except OSError:
        raise ConfigError(
            f"{where}: {path}: too many levels of symbolic links in the image tree"
        ) from None
    if found.escape is not None:
        raise ConfigError(
            f"{where}: {path}: expected a path inside the image tree, but {found.escape} "
            "climbs above its root"
        )
    return Path(os.fspath(tree).rstrip("/") + found.path)


def install_file(tree: Path, path: str, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to image path `path` in `tree`, as a new inode (see `replace_file`)."""
    replace_file(host_path(tree, path, path), data, mode)


def replace_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` as a new inode (breaking any hard link to the cache)."""
    if path.is_symlink() or path.exists():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _read_modes(overlay: Path) -> dict[str, ModeEntry]:
    file = overlay / MODES_FILE
    entries: dict[str, ModeEntry] = {}
    if not file.exists() and not file.is_symlink():
        return entries
    if file.is_symlink() or not file.is_file():
        # Reading through a link would read (and quote in errors) a file of the build host's.
        raise ConfigError(f"{file}: expected a regular file, not a symbolic link or other kind")
    try:
        text = file.read_bytes().decode()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{file}: expected UTF-8 text (byte {e.start} is not)") from None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        where = f"{file}:{number}"
        if len(words) != 4 or not words[0].startswith("/"):
            raise ConfigError(
                f"{where}: expected '/path MODE USER GROUP' (e.g. '/etc/x 0600 root root'), "
                f"got {raw!r}"
            )
        path = words[0].rstrip("/") or "/"
        if "\0" in path:
            # No file name holds one, and the system calls refuse it with a ValueError.
            raise ConfigError(f"{where}: expected a path without NUL characters, got {words[0]!r}")
        parts = path.split("/")[1:] if path != "/" else []
        if any(part in ("", ".", "..") for part in parts):
            raise ConfigError(
                f"{where}: expected a normalised absolute path inside the image (no '.', '..' "
                f"or '//'), got {words[0]!r}"
            )
        try:
            # int() alone also takes "-1" (which chmod makes 07777), "+7", "0o7" and "6_44".
            if not re.fullmatch("[0-7]+", words[1]):
                raise ValueError
            mode = int(words[1], 8)
        except ValueError:
            raise ConfigError(f"{where}: mode {words[1]!r} is not an octal number") from None
        if mode > 0o7777:
            raise ConfigError(f"{where}: mode {words[1]!r} is out of range")
        if path in entries:
            raise ConfigError(
                f"{where}: expected each path once, but {path} is already given on line "
                f"{entries[path].where.rpartition(':')[2]}"
            )
        entries[path] = ModeEntry(mode, words[2], words[3], where)
    return entries


def _tree_ids(tree: Path, user: str, group: str, where: str) -> tuple[int, int]:
    """Look up user and group in the image's own passwd/group files, never the host's."""

    def lookup(file: str, name: str) -> int | None:
        # Followed inside the tree: an absolute link to /etc/passwd must not read the host's.
        table = host_path(tree, f"/etc/{file}", where, follow=True)
        for line in table.read_text(errors="replace").splitlines():
            fields = line.split(":")
            if fields[0] == name and len(fields) > 2 and fields[2].isdigit():
                return int(fields[2])
        return None

    uid, gid = lookup("passwd", user), lookup("group", group)
    if uid is None:
        raise ConfigError(f"{where}: user {user!r} does not exist in the image")
    if gid is None:
        raise ConfigError(f"{where}: group {group!r} does not exist in the image")
    return uid, gid


def unit_string(value: str) -> str:
    """`value` as one double-quoted word of a systemd unit setting (Environment=, an argument of
    ExecStart=): `%` doubled (specifiers), `\\` and `"` escaped; a control character is refused.
    In ExecStart= a `$` still expands a variable: write `$$` in the value for a literal one."""
    if not value.isprintable():
        raise ValueError(f"{value!r}: a systemd unit value cannot hold a control character")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


def render_template(source: Path, variables: Mapping[str, Any]) -> str:
    """Render one jinja2 template strictly: an undefined variable is an error naming both."""
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    # A value pasted into quotes in another format breaks that format on a quote, backslash,
    # newline or (in a unit file) '%': `{{ x | toml }}` and `{{ x | unit }}` write it quoted.
    env.filters["toml"] = toml_string
    env.filters["unit"] = unit_string
    text = read_utf8(source, ConfigError)
    try:
        template = env.from_string(text)
    except RecursionError:
        # jinja2's parser recurses once per nested bracket: '{{ [[[[…' a few hundred deep.
        raise ConfigError(f"{source}: template syntax error: nested too deeply") from None
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"{source}:{e.lineno}: template syntax error: {e.message}") from None
    try:
        return template.render(**variables)
    except jinja2.UndefinedError as e:
        raise ConfigError(f"{source}: undefined variable in template: {e.message}") from None
    # What an expression in a template can raise ({{ x.y() }} on None, {{ 1 / 0 }}, a loop that
    # recurses, an unknown filter inside a block, which jinja2 reports only when the block runs):
    # the template's bug, named with its file, never a traceback of the build.
    except (
        jinja2.TemplateError,
        RecursionError,
        TypeError,
        ValueError,
        ArithmeticError,
        LookupError,
    ) as e:
        raise ConfigError(
            f"{source}: template cannot be rendered: {type(e).__name__}: {e}"
        ) from None


def apply_overlay(overlay: Path, tree: Path, variables: Mapping[str, Any]) -> list[str]:
    """Copy one overlay onto the tree; return the installed paths (as absolute in-tree paths)."""
    if not overlay.is_dir():
        raise ConfigError(f"overlay directory {overlay} does not exist")
    modes = _read_modes(overlay)
    installed: list[str] = []
    for source in sorted(overlay.rglob("*")):
        rel = source.relative_to(overlay)
        if rel.parts[0] == MODES_FILE:
            continue
        name = str(rel)
        rendered: bytes | None = None
        if source.is_file() and not source.is_symlink() and name.endswith(".j2"):
            name = name.removesuffix(".j2")
            rendered = render_template(source, variables).encode()
        abs_path = "/" + name
        target = host_path(tree, abs_path, str(source))
        kind = source.lstat().st_mode
        if stat.S_ISLNK(kind):
            _check_link(tree, source, abs_path)
            if target.is_symlink() or target.is_file():
                target.unlink()
            elif target.is_dir():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(source), target)
            os.lchown(target, 0, 0)
        elif stat.S_ISDIR(kind):
            if target.is_symlink():
                raise ConfigError(
                    f"{source}: is a directory, but {abs_path} in the image is not: it is a "
                    f"symbolic link to {os.readlink(target)}; expected a directory there (put "
                    "the files under the link's target instead)"
                )
            if target.exists() and not target.is_dir():
                raise ConfigError(f"{source}: is a directory, but {abs_path} in the image is not")
            target.mkdir(parents=True, exist_ok=True)
            os.chmod(target, 0o755)
            os.chown(target, 0, 0)
        elif stat.S_ISREG(kind):
            data = rendered if rendered is not None else source.read_bytes()
            mode = 0o755 if os.access(source, os.X_OK) else 0o644
            replace_file(target, data, mode)
            os.chown(target, 0, 0)
        else:
            # Reading a FIFO blocks forever and a device can be endless: neither is a file.
            raise ConfigError(
                f"{source}: expected a regular file, a directory or a symbolic link, not a "
                f"{_kind(kind)}"
            )
        installed.append(abs_path)
    for path, entry in modes.items():
        where = f"{overlay / MODES_FILE}: {path}"
        target = host_path(tree, path, entry.where)
        if not target.exists() and not target.is_symlink():
            raise ConfigError(f"{where}: no such file in the image after applying the overlay")
        uid, gid = _tree_ids(tree, entry.user, entry.group, where)
        os.lchown(target, uid, gid)
        if not target.is_symlink():
            os.chmod(target, entry.mode)
    return installed


def _check_link(tree: Path, source: Path, path: str) -> None:
    """Refuse a link whose target, read from where it will be in the image, leads out of it.

    An absolute target names the image's own file and stays inside; a relative one with more
    `..` than it has directories above it would, on the build host, name something outside.
    """
    target = os.readlink(source)
    host_path(
        tree,
        posixpath.join(posixpath.dirname(path), target),
        f"{source}: a symbolic link to {target}",
        follow=True,
    )


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISFIFO, "named pipe"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    )
    return next((name for test, name in kinds if test(mode)), "special file")


def install_agent(updater_dir: Path, tree: Path) -> None:
    """Install the update agent's Python package and its units, commands and data into /usr."""
    where = "installing the update agent"
    package = host_path(tree, "/usr/lib/python3/dist-packages/updater", where)
    if package.is_symlink():
        package.unlink()
    elif package.exists():
        shutil.rmtree(package)
    package.mkdir(parents=True)
    for source in sorted(updater_dir.rglob("*.py")):
        rel = source.relative_to(updater_dir)
        if "__pycache__" in rel.parts or rel.parts[0] in ("units", "bin"):
            continue
        replace_file(package / rel, source.read_bytes(), 0o644)
    units = updater_dir / "units"
    if units.is_dir():
        for unit in sorted(units.iterdir()):
            install_file(tree, f"/usr/lib/systemd/system/{unit.name}", unit.read_bytes(), 0o644)
    commands = updater_dir / "bin"
    if commands.is_dir():
        for command in sorted(commands.iterdir()):
            install_file(tree, f"/usr/bin/{command.name}", command.read_bytes(), 0o755)
