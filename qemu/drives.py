"""Config drives for test machines: what a cloud would attach, as small FAT images.

`make_cidata` builds a NoCloud seed (label `cidata`: `user-data`, `meta-data`) and
`make_config_drive` an OpenStack config drive (label `config-2`: `openstack/latest/user_data`,
`openstack/latest/meta_data.json`). Attach either with `VMConfig(extra_disks=(path,))`; Berth's
provisioning finds them by label. Built with mkfs.vfat and mtools, without root or loop devices.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path

from builder.run import run

_MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}
_MIN_SIZE = 2 << 20


def make_cidata(path: Path, user_data: bytes, meta_data: str) -> Path:
    """A NoCloud seed image at `path`; `meta_data` is its YAML (`instance-id`, `local-hostname`)."""
    return make_vfat(path, "cidata", {"user-data": user_data, "meta-data": meta_data.encode()})


def make_config_drive(path: Path, user_data: bytes, meta: Mapping[str, object]) -> Path:
    """An OpenStack config drive image at `path`; `meta` becomes meta_data.json."""
    files = {
        "openstack/latest/user_data": user_data,
        "openstack/latest/meta_data.json": json.dumps(dict(meta), indent=2).encode(),
    }
    return make_vfat(path, "config-2", files)


def make_vfat(path: Path, label: str, files: Mapping[str, bytes]) -> Path:
    """A FAT image labelled `label` holding `files` (relative paths, '/'-separated)."""
    content = sum(len(data) for data in files.values())
    # FAT needs room for its tables and clusters; round up to whole MiB.
    size = max(_MIN_SIZE, (2 * content + (1 << 20)) // (1 << 20) * (1 << 20))
    path.unlink(missing_ok=True)
    with path.open("wb") as image:
        image.truncate(size)
    # mkfs.fat warns that lowercase labels "might not work on some systems"; NoCloud wants them.
    run(["mkfs.vfat", "-n", label, path], quiet=True, env=_MTOOLS_ENV)
    image_arg = ["-i", str(path)]
    directories = sorted(
        {"/".join(name.split("/")[:i]) for name in files for i in range(1, name.count("/") + 1)},
        key=lambda d: d.count("/"),
    )
    if directories:
        run(["mmd", *image_arg, *(f"::{d}" for d in directories)], quiet=True, env=_MTOOLS_ENV)
    with tempfile.TemporaryDirectory(prefix="berth-drive-") as staging:
        for index, (name, data) in enumerate(files.items()):
            source = Path(staging) / str(index)
            source.write_bytes(data)
            run(["mcopy", *image_arg, source, f"::{name}"], quiet=True, env=_MTOOLS_ENV)
    return path
