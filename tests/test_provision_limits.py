"""Unbounded work in provisioning: every decompression stops at one cap, and a plan's contents at
another, with real gzip bombs (1 GiB of zeros in about 1 MB) on every path that inflates."""

from __future__ import annotations

import base64
import functools
import gzip
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from updater.provision import plan
from updater.provision.cloudconfig import parse_user_data
from updater.provision.ignition import parse_ignition
from updater.provision.plan import (
    MAX_DECOMPRESSED,
    MAX_GZIP_MEMBERS,
    MiB,
    ProvisionError,
    gunzip,
)
from updater.provision.sources import decode_guestinfo

REPO = Path(__file__).resolve().parent.parent
SOURCE = "test source"
CAP = f"at most {MAX_DECOMPRESSED // MiB} MiB"


@functools.cache
def zeros_gzip(mib: int) -> bytes:
    """`mib` MiB of zeros as one gzip member, built without ever holding them uncompressed.

    With a full flush after each MiB, every MiB after the first compresses to the same bytes, so
    a 1 GiB bomb costs one MiB of compression and a CRC pass.
    """
    chunk = bytes(MiB)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    rest = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(chunk, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    body = first + rest * (mib - 1) + deflate.flush(zlib.Z_FINISH)
    return header + body + struct.pack("<II", crc, (mib * MiB) & 0xFFFFFFFF)


BOMB = 1024  # MiB: 1 GiB of zeros


def test_the_bomb_is_real() -> None:
    # The same construction at any size: small enough here to check against the gzip module.
    assert gzip.decompress(zeros_gzip(8)) == bytes(8 * MiB)
    assert len(zeros_gzip(BOMB)) < 1.1 * MiB


def refusal(parse: Callable[[], object]) -> str:
    with pytest.raises(ProvisionError) as info:
        parse()
    return str(info.value)


# Run in a child process so that its peak memory is its own: `data` is the input, the expression
# must raise a ProvisionError, whose message the child prints.
_CHILD = """
import sys
from updater.provision.__main__ import parse_config
from updater.provision.cloudconfig import classify, parse_user_data
from updater.provision.ignition import parse_ignition
from updater.provision.plan import ProvisionError
from updater.provision.sources import decode_guestinfo

data = open(sys.argv[1], "rb").read()
try:
    eval(sys.argv[2])
except ProvisionError as e:
    print(e)
else:
    print("accepted")
# The peak of this process's own memory since exec. Not wait4's ru_maxrss: Linux starts that at
# the resident size of the process that forked (vfork'd) the child, so a test run whose pytest
# has grown past the bound would fail every case however little the child used.
with open("/proc/self/status") as status:
    print(next(line for line in status if line.startswith("VmHWM:")).split()[1])
"""


def refused_in_child(tmp_path: Path, data: bytes, expression: str, memory: int) -> str:
    """The message `expression` refuses `data` with, in a child that must stay within `memory`
    bytes (resident, at its peak) and finish in seconds: a bomb is never inflated whole."""
    path = tmp_path / "input"
    path.write_bytes(data)
    start = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), expression],
        cwd=REPO,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert child.stdout is not None
    output = child.stdout.read().decode()
    child.wait()
    seconds = time.monotonic() - start
    assert child.returncode == 0, output
    message, peak_kib = output.strip().rsplit("\n", 1)
    assert int(peak_kib) * 1024 < memory, f"peak {int(peak_kib) >> 10} MiB"
    assert seconds < 30, f"{seconds:.1f} s"
    return message.strip()


# One decompression's output, copied once when done, and the interpreter with its modules.
ONE = 2 * MAX_DECOMPRESSED + 96 * MiB


def cloud_config_file(encoding: str, content: str) -> bytes:
    entry = {"path": "/etc/bomb", "encoding": encoding, "content": content}
    return ("#cloud-config\n" + json.dumps({"write_files": [entry]})).encode()


def ignition_file(**contents: object) -> bytes:
    entry = {"path": "/etc/bomb", "contents": contents}
    return json.dumps({"ignition": {"version": "3.4.0"}, "storage": {"files": [entry]}}).encode()


def data_url(data: bytes) -> str:
    return "data:;base64," + base64.b64encode(data).decode()


def test_gzipped_user_data_bomb(tmp_path: Path) -> None:
    for expression in (
        "parse_user_data(data, 'test source')",
        "classify(data, 'test source')",
        # berth-provision's dispatch decompresses before it can tell Ignition from cloud-config.
        "parse_config(data, 'test source')",
    ):
        message = refused_in_child(tmp_path, zeros_gzip(BOMB), expression, ONE)
        assert message.startswith(f"{SOURCE}: gzip'd user-data: expected gzip data that decomp")
        assert CAP in message


@pytest.mark.parametrize(
    ("encoding", "content"),
    [
        ("gz+b64", base64.b64encode(zeros_gzip(BOMB)).decode()),
        ("gzip+base64", base64.encodebytes(zeros_gzip(BOMB)).decode()),  # with line breaks
    ],
)
def test_write_files_bomb(tmp_path: Path, encoding: str, content: str) -> None:
    data = cloud_config_file(encoding, content)
    message = refused_in_child(tmp_path, data, "parse_user_data(data, 'test source')", ONE)
    assert message.startswith(f"{SOURCE}: write_files[0].content: expected gzip data")
    assert CAP in message


def test_write_files_binary_gzip_bomb(tmp_path: Path) -> None:
    text = "!!binary |\n    " + base64.b64encode(zeros_gzip(BOMB)).decode()
    data = f"#cloud-config\nwrite_files:\n- path: /etc/bomb\n  encoding: gzip\n  content: {text}\n"
    message = refused_in_child(tmp_path, data.encode(), "parse_user_data(data, 'test source')", ONE)
    assert message.startswith(f"{SOURCE}: write_files[0].content: expected gzip data")
    assert CAP in message


@pytest.mark.parametrize("field", ["contents", "append"])
def test_ignition_data_url_bomb(tmp_path: Path, field: str) -> None:
    resource = {"source": data_url(zeros_gzip(BOMB)), "compression": "gzip"}
    entry = {"path": "/etc/bomb", field: resource if field == "contents" else [resource]}
    config = json.dumps({"ignition": {"version": "3.4.0"}, "storage": {"files": [entry]}})
    message = refused_in_child(
        tmp_path, config.encode(), "parse_ignition(data, 'test source')", ONE
    )
    where = "contents" if field == "contents" else "append[0]"
    assert message.startswith(
        f"{SOURCE} (Ignition 3.4.0): storage.files[0].{where}.compression: expected gzip data"
    )
    assert CAP in message


def test_ignition_fetched_bomb(tmp_path: Path) -> None:
    config = ignition_file(source="https://config.invalid/bomb.gz", compression="gzip")
    (tmp_path / "bomb.gz").write_bytes(zeros_gzip(BOMB))
    fetch = f"lambda url, headers: open({str(tmp_path / 'bomb.gz')!r}, 'rb').read()"
    expression = f"parse_ignition(data, 'test source', fetch={fetch})"
    message = refused_in_child(tmp_path, config, expression, ONE)
    assert "storage.files[0].contents.compression: expected gzip data" in message
    assert CAP in message


def test_vmware_guestinfo_bomb(tmp_path: Path) -> None:
    value = base64.b64encode(zeros_gzip(BOMB))
    expression = "decode_guestinfo(data, 'gzip+base64', 'VMware guestinfo.userdata')"
    message = refused_in_child(tmp_path, value, expression, ONE)
    assert message.startswith("VMware guestinfo.userdata: gzip+base64 value: expected gzip data")
    assert CAP in message


def test_exactly_the_cap_is_decompressed() -> None:
    at_cap = zeros_gzip(MAX_DECOMPRESSED // MiB)
    ignition = parse_ignition(ignition_file(source=data_url(at_cap), compression="gzip"), SOURCE)
    assert len(ignition.files[0].contents) == MAX_DECOMPRESSED
    user_data = cloud_config_file("gz+b64", base64.b64encode(at_cap).decode())
    cloud_plan = parse_user_data(user_data, SOURCE)
    assert cloud_plan is not None and len(cloud_plan.files[0].contents) == MAX_DECOMPRESSED


def test_members_padding_and_empty_data_as_gzip_reads_them() -> None:
    members = gzip.compress(b"one ") + gzip.compress(b"two") + bytes(16)
    assert gunzip(members, SOURCE, "f") == gzip.decompress(members) == b"one two"
    assert gunzip(b"", SOURCE, "f") == gzip.decompress(b"") == b""
    many = gzip.compress(b"x") * MAX_GZIP_MEMBERS
    assert gunzip(many, SOURCE, "f") == b"x" * MAX_GZIP_MEMBERS


def test_a_stream_of_empty_members_is_refused_at_once() -> None:
    # 16 MiB of empty members inflate to nothing, but each costs a copy of the rest: the gzip
    # module takes a quarter of an hour over them.
    empty = gzip.compress(b"")
    start = time.monotonic()
    message = refusal(lambda: gunzip(empty * (16 * MiB // len(empty)), SOURCE, "f"))
    assert time.monotonic() - start < 2
    assert message == f"{SOURCE}: f: expected gzip data (more than 64 concatenated gzip members)"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (zeros_gzip(1)[:-8] + bytes(4) + b"\x01\0\0\0", "incorrect data check"),
        (zeros_gzip(1)[:-20], "the data ends before the end of the gzip stream"),
        (b"\x1f\x8bnot deflate", "unknown compression method"),
        (gzip.compress(b"x") + b"junk", "data after the end of the gzip stream that is not gzip"),
        (b"plain", "no gzip header"),
    ],
)
def test_broken_gzip_says_why(data: bytes, reason: str) -> None:
    message = refusal(lambda: gunzip(data, SOURCE, "f"))
    assert message.startswith(f"{SOURCE}: f: expected gzip data (") and reason in message
    # Where the data says it is gzip, callers keep their own words for it.
    guestinfo = refusal(lambda: decode_guestinfo(base64.b64encode(data), "gz+b64", "guestinfo.x"))
    assert guestinfo == f"guestinfo.x: not gzip data: {message.split(' (', 1)[1][:-1]}"
    if data.startswith(b"\x1f\x8b"):
        assert "user-data starts like gzip data but does not decompress: " in refusal(
            lambda: parse_user_data(data, SOURCE)
        )


def test_many_files_under_the_cap_are_refused_in_all(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each file is well below the decompression cap; together they pass the plan's, made small
    # here so that the test inflates megabytes, not hundreds of them.
    monkeypatch.setattr(plan, "MAX_PLAN_CONTENTS", 5 * MiB)
    content = base64.b64encode(zeros_gzip(2)).decode()
    entries = [{"path": f"/etc/f{i}", "encoding": "gz+b64", "content": content} for i in range(3)]
    user_data = ("#cloud-config\n" + json.dumps({"write_files": entries})).encode()
    message = refusal(lambda: parse_user_data(user_data, SOURCE))
    assert message.startswith(f"{SOURCE}: write_files[2].content: expected file contents")
    assert "5 MiB in all" in message

    source = {"source": data_url(zeros_gzip(2)), "compression": "gzip"}
    files = [
        {"path": "/etc/f0", "contents": source},
        {"path": "/etc/f1", "append": [source, source]},  # appends count as they are loaded
    ]
    config = json.dumps({"ignition": {"version": "3.4.0"}, "storage": {"files": files}}).encode()
    message = refusal(lambda: parse_ignition(config, SOURCE))
    assert (
        f"{SOURCE} (Ignition 3.4.0): storage.files[1].append[1]: expected file contents" in message
    )
    two = [{"path": f"/etc/f{i}", "contents": source} for i in range(2)]
    config = json.dumps({"ignition": {"version": "3.4.0"}, "storage": {"files": two}}).encode()
    assert len(parse_ignition(config, SOURCE).files) == 2
