"""The image's own users and groups: sysusers.d applied to the tree's account databases.

Packages make their system users in maintainer scripts while the tree is bootstrapped; what the
overlays declare in `/usr/lib/sysusers.d` (the admin account `core`, the groups `wheel` and
`docker`) is applied here, with the tree's own systemd-sysusers, so the image's `/etc/passwd`
already holds it and a machine's first boot has nothing to write. The same files are applied
again on every boot (systemd-sysusers.service), which is how they reach machines whose
`/etc/passwd` is their own copy on STATE.
"""

from __future__ import annotations

from pathlib import Path

from builder.run import run
from builder.treetool import tree_command

LAST_CHANGE_DAY = 1
# What shadow's tools and systemd-sysusers leave beside the databases: backups (which would
# carry old entries into the image) and the lock file.
LEFTOVERS = ("passwd-", "shadow-", "group-", "gshadow-", ".pwd.lock")


def apply_sysusers(tree: Path) -> str:
    """Create what the tree's sysusers.d files declare; returns systemd-sysusers' report."""
    # A fixed "last password change" so that two builds of the same inputs write the same
    # /etc/shadow: day 1, not the bootstrap's day 0, which PAM reads as "must change the
    # password now" and so refuses core's SSH logins.
    result = run(
        [*tree_command(tree, "/usr/bin/systemd-sysusers"), f"--root={tree}"],
        env={"SOURCE_DATE_EPOCH": str(LAST_CHANGE_DAY * 86400)},
        capture=True,
    )
    for name in LEFTOVERS:
        (tree / "etc" / name).unlink(missing_ok=True)
    return (result.stdout + result.stderr).decode(errors="replace").strip()
