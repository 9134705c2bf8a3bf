"""A cloud's key pair logs in as `core` (EC2 IMDSv2, GCE ssh-keys, Azure IMDS), and provisioned
users get subordinate id ranges for rootless containers.

The metadata services are `MetadataServer` on 127.0.0.1, which checks what the real ones check;
`provision()` runs whole against a directory tree, as berth-provision does on a machine.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.misbehaving_server import MetadataServer
from updater.provision.__main__ import provision
from updater.provision.apply import SUB_ID_COUNT, SUB_ID_MIN, apply_plan
from updater.provision.plan import Plan, ProvisionError, User, add_user_keys
from updater.provision.sources import (
    DEFAULT_USER,
    PlatformKeys,
    SourceEnv,
    check_public_key,
    find_platform_keys,
)
from updater.provision.sources import Platform as P

ED = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIveEaMRWxK4bp0Cmn5vMpMYpAjsJt1IS5FTn2dprcTb"
RSA = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDHn2eh"
ECDSA = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTY="


@pytest.fixture
def metadata() -> Iterator[MetadataServer]:
    with MetadataServer() as server:
        yield server


def env(server: MetadataServer, tmp_path: Path) -> SourceEnv:
    fw_cfg = tmp_path / "no-fw-cfg"
    fw_cfg.mkdir(exist_ok=True)
    return SourceEnv(metadata_url=server.url, metadata_wait=0.0, fw_cfg_dir=fw_cfg)


# -- where the keys come from ---------------------------------------------------------------


def test_ec2_key_pairs(metadata: MetadataServer, tmp_path: Path) -> None:
    metadata.ec2_keys = {"laptop": f"{ED} laptop", "ci": f"{RSA} ci"}
    keys = find_platform_keys(P.EC2, env=env(metadata, tmp_path))
    assert keys == PlatformKeys((f"{ED} laptop", f"{RSA} ci"), "EC2 IMDSv2 public-keys")
    assert metadata.paths() == [
        "PUT /latest/api/token",
        "GET /latest/meta-data/public-keys/",
        "GET /latest/meta-data/public-keys/0/openssh-key",
        "GET /latest/meta-data/public-keys/1/openssh-key",
    ]


def test_ec2_without_a_key_pair_is_none(
    metadata: MetadataServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert find_platform_keys(P.EC2, env=env(metadata, tmp_path)) is None
    assert "launched without a key pair" in caplog.text


def test_ec2_answers_that_are_not_keys_are_refused(
    metadata: MetadataServer, tmp_path: Path
) -> None:
    metadata.ec2_keys = {"bad": "not a key at all"}
    with pytest.raises(ProvisionError) as error:
        find_platform_keys(P.EC2, env=env(metadata, tmp_path))
    message = str(error.value)
    assert "/latest/meta-data/public-keys/0/openssh-key" in message
    assert "expected an SSH public key on one line" in message and "'not a key at all'" in message


def test_gce_instance_and_project_keys(metadata: MetadataServer, tmp_path: Path) -> None:
    metadata.gce_attributes = {
        "instance/attributes/ssh-keys": f"alice:{ED} alice@laptop\n\n".encode(),
        "instance/attributes/sshKeys": f"legacy:{ECDSA} old".encode(),
        "project/attributes/ssh-keys": f"bob:{RSA} bob\nalice:{ED} alice@laptop\n".encode(),
    }
    keys = find_platform_keys(P.GCE, env=env(metadata, tmp_path))
    # Each key once, whoever the line names: they all log in as core.
    assert keys is not None and keys.keys == (f"{ED} alice@laptop", f"{ECDSA} old", f"{RSA} bob")
    assert all(s.headers.get("metadata-flavor") == "Google" for s in metadata.seen)


def test_gce_blocking_project_keys_and_expired_keys(
    metadata: MetadataServer, tmp_path: Path
) -> None:
    expired = 'google-ssh {"userName":"carol@example.com","expireOn":"2001-01-01T00:00:00+0000"}'
    valid = 'google-ssh {"userName":"dave@example.com","expireOn":"2999-01-01T00:00:00+0000"}'
    metadata.gce_attributes = {
        "instance/attributes/block-project-ssh-keys": b"TRUE",
        "instance/attributes/ssh-keys": f"carol:{RSA} {expired}\ndave:{ED} {valid}\n".encode(),
        "project/attributes/ssh-keys": f"bob:{RSA} bob".encode(),
    }
    keys = find_platform_keys(P.GCE, env=env(metadata, tmp_path))
    assert keys is not None and keys.keys == (f"{ED} {valid}",)
    assert "GET /computeMetadata/v1/project/attributes/ssh-keys" not in metadata.paths()
    assert any("carol expired" in note for note in keys.notes)
    assert any("blocks project-wide" in note for note in keys.notes)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (f"{ED}", "line 1: expected '<user>:<ssh public key>'"),
        (f"alice:{ED} google-ssh {{not json", "a JSON object after 'google-ssh'"),
        (f'alice:{ED} google-ssh {{"expireOn": "tomorrow"}}', "google-ssh.expireOn"),
        ("alice:ssh-ed25519", "expected an SSH public key"),
        ("alice:ssh-foo AAAA", "expected an SSH public key"),
    ],
)
def test_gce_lines_that_are_not_user_and_key_are_refused(
    line: str, expected: str, metadata: MetadataServer, tmp_path: Path
) -> None:
    metadata.gce_attributes = {"instance/attributes/ssh-keys": line.encode()}
    with pytest.raises(ProvisionError, match="instance/attributes/ssh-keys") as error:
        find_platform_keys(P.GCE, env=env(metadata, tmp_path))
    assert expected in str(error.value)


def test_gce_without_keys_is_none(metadata: MetadataServer, tmp_path: Path) -> None:
    assert find_platform_keys(P.GCE, env=env(metadata, tmp_path)) is None


def test_gce_answer_from_another_server_is_refused(
    metadata: MetadataServer, tmp_path: Path
) -> None:
    metadata.gce_flavor = False
    with pytest.raises(ProvisionError, match="not the GCE metadata server"):
        find_platform_keys(P.GCE, env=env(metadata, tmp_path))


def test_azure_public_keys(metadata: MetadataServer, tmp_path: Path) -> None:
    metadata.azure_keys = [
        {
            "keyData": f"{RSA} generated-by-azure\r\n",
            "path": "/home/azureuser/.ssh/authorized_keys",
        },
        {"keyData": ED, "path": "/home/azureuser/.ssh/authorized_keys"},
    ]
    keys = find_platform_keys(P.AZURE, env=env(metadata, tmp_path))
    assert keys == PlatformKeys((f"{RSA} generated-by-azure", ED), "Azure IMDS publicKeys")
    assert metadata.seen[0].headers.get("metadata") == "true"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"[{", "Azure IMDS publicKeys: (top level): expected JSON"),
        (b'{"keyData": "x"}', "expected a list of {keyData, path}"),
        (b'[{"path": "/home/a"}]', "[0].keyData: expected an SSH public key"),
        (b'[{"keyData": "ssh-rsa AAAA\\nssh-rsa BBBB"}, {"keyData": 7}]', "[1].keyData"),
    ],
)
def test_azure_answers_that_are_not_keys_are_refused(
    answer: bytes, expected: str, metadata: MetadataServer, tmp_path: Path
) -> None:
    metadata.azure_keys = answer
    with pytest.raises(ProvisionError) as error:
        find_platform_keys(P.AZURE, env=env(metadata, tmp_path))
    assert expected in str(error.value)


def test_azure_without_keys_is_none(metadata: MetadataServer, tmp_path: Path) -> None:
    assert find_platform_keys(P.AZURE, env=env(metadata, tmp_path)) is None
    metadata.azure_keys = []
    assert find_platform_keys(P.AZURE, env=env(metadata, tmp_path)) is None


@pytest.mark.parametrize("platform", [P.QEMU, P.METAL, P.VMWARE, P.OPENSTACK])
def test_platforms_without_key_pairs_ask_nobody(
    platform: P, metadata: MetadataServer, tmp_path: Path
) -> None:
    assert find_platform_keys(platform, env=env(metadata, tmp_path)) is None
    assert metadata.seen == []


@pytest.mark.parametrize(
    "key",
    [
        "",
        "ssh-ed25519",
        "ssh-ed25519 not*base64",
        "ssh-ed25519 AAAA\0x",
        'command="rm -rf /" ssh-ed25519 AAAA',  # options are the operator's to give, not a cloud's
        "ssh-ed25519 AAAA\rssh-rsa BBBB",
    ],
)
def test_a_key_line_is_one_plain_key(key: str) -> None:
    with pytest.raises(ProvisionError, match="somewhere: key: expected an SSH public key"):
        check_public_key(key, "somewhere")


# -- the keys reach core ---------------------------------------------------------------------

PASSWD = (
    "root:x:0:0:root:/root:/bin/bash\n"
    "core:x:1000:1000:Berth admin:/home/core:/bin/bash\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
)
SHADOW = "root:*:1::::::\ncore:!*:1::::::\nnobody:*:1::::::\n"
GROUP = "root:x:0:\nsudo:x:27:core\nwheel:x:988:core\ncore:x:1000:\nnogroup:x:65534:\n"


@pytest.fixture
def machine(tmp_path: Path) -> Path:
    """A Berth machine's tree as the image leaves it: core exists, with its subordinate ids."""
    tree = tmp_path / "root"
    for path, text in (
        ("etc/passwd", PASSWD),
        ("etc/shadow", SHADOW),
        ("etc/group", GROUP),
        ("etc/subuid", f"core:{SUB_ID_MIN}:{SUB_ID_COUNT}\n"),
        ("etc/subgid", f"core:{SUB_ID_MIN}:{SUB_ID_COUNT}\n"),
    ):
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text(text)
    (tree / "home/core").mkdir(parents=True)
    (tree / "root").mkdir()
    return tree


def stamp(tree: Path) -> dict[str, str]:
    record: dict[str, str] = json.loads((tree / "var/lib/berth/provisioned").read_text())
    return record


def test_a_key_pair_without_user_data_logs_in_as_core(
    metadata: MetadataServer, machine: Path, tmp_path: Path
) -> None:
    metadata.ec2_keys = {"laptop": f"{ED} laptop"}
    assert provision(machine, env=env(metadata, tmp_path), platform=P.EC2) == 0
    keys = machine / "home/core/.ssh/authorized_keys"
    assert keys.read_text() == f"{ED} laptop\n"
    assert (keys.stat().st_mode & 0o777, keys.stat().st_uid) == (0o600, 1000)
    assert (machine / "home/core/.ssh").stat().st_uid == 1000
    record = stamp(machine)
    assert record["result"] == "applied" and record["format"] == "ssh-keys"
    assert record["keys"] == "1 for core from EC2 IMDSv2 public-keys"
    # core kept its account and its range; nothing else about the machine changed.
    assert (machine / "etc/passwd").read_text() == PASSWD
    assert (machine / "etc/subuid").read_text() == f"core:{SUB_ID_MIN}:{SUB_ID_COUNT}\n"


def test_a_config_and_a_key_pair_both_count(
    metadata: MetadataServer, machine: Path, tmp_path: Path
) -> None:
    # A Fedora CoreOS config gives core a key of its own: it comes first, the cloud's follows.
    metadata.gce_user_data = json.dumps(
        {
            "ignition": {"version": "3.4.0"},
            "passwd": {
                "users": [
                    {"name": "core", "sshAuthorizedKeys": [RSA]},
                    {"name": "erin", "groups": ["wheel", "sudo"]},
                ]
            },
        }
    ).encode()
    metadata.gce_attributes = {"project/attributes/ssh-keys": f"core:{ED} from-gce".encode()}
    assert provision(machine, env=env(metadata, tmp_path), platform=P.GCE) == 0
    lines = (machine / "home/core/.ssh/authorized_keys").read_text().splitlines()
    assert lines == [RSA, f"{ED} from-gce"]
    assert "erin:x:1001:1001" in (machine / "etc/passwd").read_text()
    assert "wheel:x:988:core,erin" in (machine / "etc/group").read_text()
    record = stamp(machine)
    assert record["format"] == "ignition" and record["keys"].endswith("GCE metadata ssh-keys")


def test_no_config_and_no_key_pair_changes_nothing(
    metadata: MetadataServer, machine: Path, tmp_path: Path
) -> None:
    before = {p: p.read_bytes() for p in (machine / "etc").iterdir()}
    assert provision(machine, env=env(metadata, tmp_path), platform=P.EC2) == 0
    assert {p: p.read_bytes() for p in (machine / "etc").iterdir()} == before
    assert not (machine / "home/core/.ssh").exists()
    assert stamp(machine)["result"] == "no config"


def test_a_broken_key_answer_stops_before_anything_is_written(
    metadata: MetadataServer, machine: Path, tmp_path: Path
) -> None:
    metadata.user_data = b"#cloud-config\nhostname: would-be\n"
    metadata.ec2_keys = {"bad": "ssh-rsa"}
    with pytest.raises(ProvisionError, match="public-keys/0/openssh-key"):
        provision(machine, env=env(metadata, tmp_path), platform=P.EC2)
    assert not (machine / "etc/hostname").exists()
    assert not (machine / "var/lib/berth/provisioned").exists()


def test_add_user_keys_merges_without_repeats() -> None:
    plan = Plan("config", "cloud-config", users=(User("core", (RSA,)), User("root", (ED,))))
    merged = add_user_keys(plan, "core", (ED, RSA), "cloud")
    assert merged.users == (User("core", (RSA, ED)), User("root", (ED,)))
    assert merged.notes == ("2 SSH key(s) for core from cloud",)
    alone = add_user_keys(None, "core", (ED,), "cloud")
    assert alone.users == (User("core", (ED,)),) and alone.format == "ssh-keys"
    assert DEFAULT_USER == "core"


# -- subordinate ids -------------------------------------------------------------------------


def ranges(tree: Path, name: str) -> list[tuple[str, int, int]]:
    rows = [line.split(":") for line in (tree / "etc" / name).read_text().splitlines()]
    return [(user, int(start), int(count)) for user, start, count in rows]


def test_new_users_get_ranges_that_never_overlap(machine: Path) -> None:
    # Someone's range sits in the middle: new ones go around it.
    for name in ("subuid", "subgid"):
        with (machine / "etc" / name).open("a") as f:
            f.write(f"ops:{SUB_ID_MIN + 2 * SUB_ID_COUNT}:1000\n")
    plan = Plan("config", "ignition", users=(User("ann"), User("ben"), User("root")))
    applied = apply_plan(plan, machine)
    uids = ranges(machine, "subuid")
    assert uids == ranges(machine, "subgid")
    assert [u for u, _, _ in uids] == ["core", "ops", "ann", "ben"]  # root gets none
    spans = sorted((start, start + count) for _, start, count in uids)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))
    assert dict((u, s) for u, s, _ in uids)["ann"] == SUB_ID_MIN + SUB_ID_COUNT
    assert any("user ann: subordinate ids" in line for line in applied.summary)
    assert stat_mode(machine / "etc/subuid") == 0o644


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


def test_ranges_stay_as_they_are_when_applied_again(machine: Path) -> None:
    apply_plan(Plan("one", "ignition", users=(User("ann"),)), machine)
    first = (machine / "etc/subuid").read_text()
    apply_plan(Plan("two", "ignition", users=(User("ann"), User("core"))), machine)
    assert (machine / "etc/subuid").read_text() == first


def test_a_machine_without_the_files_gets_them(machine: Path) -> None:
    (machine / "etc/subuid").unlink()
    (machine / "etc/subgid").unlink()
    apply_plan(Plan("config", "ignition", users=(User("core"),)), machine)
    assert ranges(machine, "subuid") == [("core", SUB_ID_MIN, SUB_ID_COUNT)]
    assert ranges(machine, "subgid") == [("core", SUB_ID_MIN, SUB_ID_COUNT)]


def test_a_malformed_subuid_file_stops_the_apply_and_changes_nothing(machine: Path) -> None:
    (machine / "etc/subuid").write_text("core:lots\n")
    before = (machine / "etc/passwd").read_text()
    with pytest.raises(ProvisionError, match=r"/etc/subuid on this machine, line 1: expected"):
        apply_plan(Plan("config", "ignition", users=(User("ann"),)), machine)
    assert (machine / "etc/passwd").read_text() == before
    assert not (machine / "home/ann").exists()
