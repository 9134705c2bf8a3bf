"""The image's system users reach machines whose /etc/passwd is their own: the build writes what
packages made in maintainer scripts as sysusers.d lines, and systemd-sysusers (the real one)
applied to an older machine's account files adds them with the image's ids."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from builder.accounts import IMAGE_SYSUSERS, image_sysusers
from builder.run import find_tool

IMAGE_PASSWD = """root:x:0:0:root:/root:/bin/bash
messagebus:x:996:996:System Message Bus:/nonexistent:/usr/sbin/nologin
_chrony:x:995:994:Chrony "daemon":/var/lib/chrony:/usr/sbin/nologin
core:x:1000:1000:Berth admin:/home/core:/bin/bash
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
"""
IMAGE_GROUP = """root:x:0:
adm:x:4:core
messagebus:x:996:
_chrony:x:994:
_clock:x:993:_chrony,core
core:x:1000:
nogroup:x:65534:
"""
DECLARED = """g adm 4 -
u root 0 - /root /bin/bash
u nobody 65534:65534 - /nonexistent
g nogroup 65534 -
u messagebus - "System Message Bus"
u core 1000 "Berth admin" /home/core /bin/bash
"""


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text(IMAGE_PASSWD)
    (root / "etc/group").write_text(IMAGE_GROUP)
    (root / "usr/lib/sysusers.d").mkdir(parents=True)
    (root / "usr/lib/sysusers.d/basic.conf").write_text(DECLARED)
    return root


def test_undeclared_system_accounts_are_written_with_the_images_ids(tree: Path) -> None:
    lines = image_sysusers(tree).splitlines()
    assert [line for line in lines if not line.startswith("#")] == [
        "g _chrony 994",
        "g _clock 993",
        'u _chrony 995:994 "Chrony daemon" /var/lib/chrony /usr/sbin/nologin',
        "m _chrony _clock",
    ]


def test_sysusers_adds_them_to_an_older_machine(tree: Path, tmp_path: Path) -> None:
    # A machine provisioned on the release before: its own /etc/passwd, with a local user.
    machine = tmp_path / "machine"
    (machine / "etc").mkdir(parents=True)
    (machine / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\nalice:x:1001:1001::/home/alice:/bin/bash\n"
    )
    (machine / "etc/group").write_text("root:x:0:\nalice:x:1001:\n")
    (machine / "etc/shadow").write_text("root:*:1::::::\nalice:*:20000::::::\n")
    (machine / "etc/gshadow").write_text("root:*::\nalice:!::\n")
    conf = machine / IMAGE_SYSUSERS.lstrip("/")
    conf.parent.mkdir(parents=True)
    conf.write_text(image_sysusers(tree))
    subprocess.run(
        [find_tool("systemd-sysusers"), f"--root={machine}"], check=True, capture_output=True
    )
    passwd = (machine / "etc/passwd").read_text()
    assert "_chrony:x:995:994:Chrony daemon:/var/lib/chrony:/usr/sbin/nologin" in passwd
    assert "alice:x:1001:1001::/home/alice:/bin/bash" in passwd  # the local user stays
    assert "_clock:x:993:_chrony" in (machine / "etc/group").read_text()
