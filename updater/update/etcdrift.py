"""/etc files that stopped following the image: changed on this machine and by the new release.

/etc is an overlay: the image's /etc below, the machine's changes above (the upper layer on
STATE). A file the operator changed hides every later release's version of it. That is what an
operator wants for their own config, but a release that changes the same file (a new sshd
default, a fix in a unit) then never arrives, silently. Every image lists its /etc with a digest
per file (`/usr/lib/berth/etc.json`, written by the build); when an update is installed the agent
keeps the booted release's list, and on the boots of the new release it names each file that
the release changed and the machine's upper layer holds (changed, deleted or under a replaced
directory): `berth-update status` lists them and after-boot logs them.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import stat
from pathlib import Path

from updater.files import write_file_atomic
from updater.release.version import Version

log = logging.getLogger(__name__)

# Where the image's list and the upper layer are: Machine.etc_list and Machine.etc_upper.
BEFORE = "etc-before.json"  # in the agent's state directory
OPAQUE = "trusted.overlay.opaque"
# The account databases follow the image another way: systemd-sysusers adds the release's users
# and groups to the machine's copies on every boot (builder/accounts.py). Not drift.
MERGED = frozenset({"passwd", "group", "shadow", "gshadow"})


def read_list(path: Path) -> dict[str, str] | None:
    """An image's /etc list (path relative to /etc -> digest); None when absent or unreadable
    (an image from before the lists, or a damaged copy: no report rather than a wrong one)."""
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in files.items()
    ):
        return None
    return files


def keep_booted_list(image_list: Path, state_dir: Path, booted: Version) -> None:
    """Before an update's boot entry is written: keep the booted release's /etc list."""
    files = read_list(image_list)
    if files is None:
        return
    doc = {"version": str(booted), "files": files}
    write_file_atomic(state_dir / BEFORE, json.dumps(doc, sort_keys=True).encode())


def machine_changes(upper: Path) -> tuple[set[str], set[str]]:
    """What the upper layer holds: entries (files, links, whiteouts) relative to /etc, and
    directories that replace the image's (opaque)."""
    entries: set[str] = set()
    opaque: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(upper):
        here = Path(dirpath)
        for name in dirnames:
            try:
                if os.getxattr(here / name, OPAQUE, follow_symlinks=False) == b"y":
                    opaque.add((here / name).relative_to(upper).as_posix())
            except OSError:
                pass
        for name in filenames:
            path = here / name
            st = path.lstat()
            if stat.S_ISCHR(st.st_mode) and st.st_rdev != 0:
                continue  # a device node someone made: not an overlay whiteout
            entries.add(path.relative_to(upper).as_posix())
    return entries, opaque


def drift(state_dir: Path, image_list: Path, upper: Path, booted: Version) -> tuple[str, ...]:
    """The /etc paths (absolute) that the release booted now changed and this machine hides
    with its own version; () when no update happened since the list was kept."""
    try:
        doc = json.loads((state_dir / BEFORE).read_bytes())
    except (OSError, ValueError):
        return ()
    before = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(before, dict) or doc.get("version") == str(booted):
        return ()
    after = read_list(image_list)
    if after is None:
        return ()
    changed = {
        p for p in before.keys() | after.keys() if before.get(p) != after.get(p) and p not in MERGED
    }
    entries, opaque = machine_changes(upper)
    hidden = {
        p for p in changed if p in entries or any(p == d or p.startswith(d + "/") for d in opaque)
    }
    return tuple(f"/etc/{p}" for p in sorted(hidden))


def report(state_dir: Path, image_list: Path, upper: Path, booted: Version) -> tuple[str, ...]:
    """`drift`, logged (one line per file) for the journal."""
    found = drift(state_dir, image_list, upper, booted)
    for path in found:
        log.warning(
            "%s: changed on this machine and by %s: the machine's copy hides the release's "
            "(see docs/updates.md, /etc across updates)",
            path,
            booted,
        )
    return found


REVERT_LIST = "lib/berth/etc/revert"  # under /var: read by the initrd's etc-revert


def schedule_revert(var: Path, paths: list[str]) -> list[str]:
    """Ask the next boot to drop the machine's copies of `paths` (absolute, under /etc), so that
    they follow the image again; returns the paths as listed (relative to /etc). Each is
    checked first: nothing is listed unless all are plain paths under /etc."""
    relative: list[str] = []
    for path in paths:
        normal = posixpath.normpath(path) if path.startswith("/") else ""
        if normal != path.rstrip("/") or not normal.startswith("/etc/") or "\n" in path:
            raise ValueError(
                f"{path!r}: expected a plain absolute path under /etc, such as /etc/ssh/sshd_config"
            )
        relative.append(normal.removeprefix("/etc/"))
    target = var / REVERT_LIST
    existing = target.read_text().splitlines() if target.is_file() else []
    listed = list(dict.fromkeys([*existing, *relative]))
    target.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(target, "".join(line + "\n" for line in listed).encode())
    return relative
