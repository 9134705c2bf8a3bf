"""Stage 2: overlays rendered onto the tree, and the update agent installed into /usr.

Each overlay is a directory `overlays/<name>/` mirroring the root tree. Files ending in `.j2` are
rendered with jinja2 in strict mode and lose the suffix. Git records neither owners nor most modes,
so everything is installed root:root, 0755 for directories and executables, 0644 otherwise, unless
the overlay's `.modes` file says otherwise, one line per path: `/etc/foo 0600 root root`.

The tree is a hard-linked copy of the cached root tree, so a file is always replaced (unlink, then
create), never written in place: writing in place would change the cache too.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from builder.errors import ConfigError

MODES_FILE = ".modes"


@dataclass(frozen=True)
class ModeEntry:
    mode: int
    user: str
    group: str


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
    if not file.exists():
        return entries
    for number, raw in enumerate(file.read_text().splitlines(), start=1):
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
        try:
            mode = int(words[1], 8)
        except ValueError:
            raise ConfigError(f"{where}: mode {words[1]!r} is not an octal number") from None
        if mode > 0o7777:
            raise ConfigError(f"{where}: mode {words[1]!r} is out of range")
        entries[words[0].rstrip("/")] = ModeEntry(mode, words[2], words[3])
    return entries


def _tree_ids(tree: Path, user: str, group: str, where: str) -> tuple[int, int]:
    """Look up user and group in the image's own passwd/group files, never the host's."""

    def lookup(file: str, name: str) -> int | None:
        for line in (tree / "etc" / file).read_text().splitlines():
            fields = line.split(":")
            if fields[0] == name and len(fields) > 2:
                return int(fields[2])
        return None

    uid, gid = lookup("passwd", user), lookup("group", group)
    if uid is None:
        raise ConfigError(f"{where}: user {user!r} does not exist in the image")
    if gid is None:
        raise ConfigError(f"{where}: group {group!r} does not exist in the image")
    return uid, gid


def render_template(source: Path, variables: Mapping[str, Any]) -> str:
    """Render one jinja2 template strictly: an undefined variable is an error naming both."""
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    try:
        template = env.from_string(source.read_text())
        return template.render(**variables)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"{source}:{e.lineno}: template syntax error: {e.message}") from None
    except jinja2.UndefinedError as e:
        raise ConfigError(f"{source}: undefined variable in template: {e.message}") from None


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
        target = tree / name
        abs_path = "/" + name
        if source.is_symlink():
            if target.is_symlink() or target.is_file():
                target.unlink()
            elif target.is_dir():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(source), target)
            os.lchown(target, 0, 0)
        elif source.is_dir():
            if target.is_symlink() or (target.exists() and not target.is_dir()):
                raise ConfigError(f"{source}: is a directory, but {abs_path} in the image is not")
            target.mkdir(parents=True, exist_ok=True)
            os.chmod(target, 0o755)
            os.chown(target, 0, 0)
        else:
            data = rendered if rendered is not None else source.read_bytes()
            mode = 0o755 if os.access(source, os.X_OK) else 0o644
            replace_file(target, data, mode)
            os.chown(target, 0, 0)
        installed.append(abs_path)
    for path, entry in modes.items():
        target = tree / path.lstrip("/")
        where = f"{overlay / MODES_FILE}: {path}"
        if not target.exists() and not target.is_symlink():
            raise ConfigError(f"{where}: no such file in the image after applying the overlay")
        uid, gid = _tree_ids(tree, entry.user, entry.group, where)
        os.lchown(target, uid, gid)
        if not target.is_symlink():
            os.chmod(target, entry.mode)
    return installed


def install_agent(updater_dir: Path, tree: Path) -> None:
    """Install the update agent's Python package and its units, commands and data into /usr."""
    package = tree / "usr/lib/python3/dist-packages/updater"
    if package.exists():
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
            replace_file(tree / "usr/lib/systemd/system" / unit.name, unit.read_bytes(), 0o644)
    commands = updater_dir / "bin"
    if commands.is_dir():
        for command in sorted(commands.iterdir()):
            replace_file(tree / "usr/bin" / command.name, command.read_bytes(), 0o755)
