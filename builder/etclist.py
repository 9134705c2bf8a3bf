"""The image's /etc as a list with a digest per entry (`/usr/lib/berth/etc.json`).

The agent compares the lists of the release it updates from and the one it booted into with
the machine's own changes to /etc (the overlay's upper layer), to name the files whose local
copy hides a change the new release makes (updater/update/etcdrift.py, which reads it).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

ETC_LIST = "/usr/lib/berth/etc.json"


def etc_list(tree: Path) -> bytes:
    """Every file and symbolic link under the tree's /etc: `sha256:<hex>:<mode>` or
    `link:<target>`, by path relative to /etc; sorted, so the same tree gives the same bytes."""
    etc = tree / "etc"
    files: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(etc):
        here = Path(dirpath)
        for name in [*filenames, *(d for d in dirnames if (here / d).is_symlink())]:
            path = here / name
            key = path.relative_to(etc).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                files[key] = f"link:{os.readlink(path)}"
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                files[key] = f"sha256:{digest}:{stat.S_IMODE(st.st_mode):04o}"
    return (json.dumps({"files": files}, indent=0, sort_keys=True) + "\n").encode()
