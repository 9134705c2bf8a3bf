"""updater.update.fetch against a real HTTP server on loopback that misbehaves on request
(tests/support/misbehaving_server.py)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import pytest

from tests.support.misbehaving_server import MisbehavingServer, Misbehaviour
from updater import files
from updater.disk import verity
from updater.errors import (
    DownloadError,
    LengthMismatchError,
    SlowRetrievalError,
    StorageError,
    VerificationError,
)
from updater.update import fetch
from updater.update.machine import FetchOptions

CONTENT = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes: not a multiple of any chunk
SHA256 = hashlib.sha256(CONTENT).hexdigest()
OFFSET = 3 * 4096 + 17
FILL = b"\xaa"
KiB = 1024
LIMITS = {f.name for f in fields(FetchOptions)}


PATH = "/root.erofs"


@pytest.fixture
def server(misbehaving: Callable[..., MisbehavingServer]) -> MisbehavingServer:
    srv = misbehaving()
    srv.files[PATH] = CONTENT
    return srv


def url(server: MisbehavingServer) -> str:
    return server.url + PATH


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    """A 'slot': pre-filled so that writes outside [OFFSET, OFFSET + len) would show."""
    path = tmp_path / "slot.img"
    path.write_bytes(FILL * (OFFSET + len(CONTENT) + 4096))
    return path


def download(server: MisbehavingServer, dest: Path, **options: object) -> None:
    """stream_to with the download limits (FetchOptions fields) and its other keywords mixed."""
    limits: dict[str, object] = {"backoff": 0.0, "timeout": (2.0, 2.0), "state_seconds": 0.0}
    limits.update({k: options.pop(k) for k in LIMITS if k in options})
    sha256 = str(options.pop("sha256", SHA256))
    length = int(options.pop("length", len(CONTENT)))  # type: ignore[call-overload]
    with dest.open("r+b") as f:
        fetch.stream_to(
            url(server),
            f,
            OFFSET,
            length,
            sha256,
            options=FetchOptions(**limits),  # type: ignore[arg-type]
            **options,  # type: ignore[arg-type]
        )


def assert_written(dest: Path, content: bytes = CONTENT) -> None:
    data = dest.read_bytes()
    assert data[:OFFSET] == FILL * OFFSET
    assert data[OFFSET : OFFSET + len(content)] == content
    assert data[OFFSET + len(content) :] == FILL * 4096


def assert_untouched(dest: Path) -> None:
    assert dest.read_bytes() == FILL * (OFFSET + len(CONTENT) + 4096)


def test_full_download_at_offset_reports_progress(server: MisbehavingServer, dest: Path) -> None:
    seen: list[int] = []
    download(server, dest, progress=seen.append, chunk=100_000)
    assert_written(dest)
    assert seen == sorted(seen) and seen[-1] == len(CONTENT)
    assert [(e.range, e.status, e.sent) for e in server.seen] == [(None, 200, len(CONTENT))]


def test_hash_mismatch_is_refused_after_the_write(server: MisbehavingServer, dest: Path) -> None:
    wrong = hashlib.sha256(b"something else").hexdigest()
    state = dest.parent / "state.json"
    with pytest.raises(VerificationError, match=f"hash to sha256 {SHA256}.*says {wrong}"):
        download(server, dest, sha256=wrong, state_path=state, state_interval=64 * KiB)
    # The bytes are there (the caller treats the slot as garbage), the resume record is not.
    assert_written(dest)
    assert not state.exists()


def test_endless_data_stops_at_length_plus_one(server: MisbehavingServer, dest: Path) -> None:
    server.rules.append(Misbehaviour(endless=True))
    with pytest.raises(LengthMismatchError, match="more than the trusted length"):
        download(server, dest)
    data = dest.read_bytes()
    # Exactly `length` bytes were written, the extra one was read and refused.
    assert data[OFFSET : OFFSET + len(CONTENT)] == b"x" * len(CONTENT)
    assert data[OFFSET + len(CONTENT) :] == FILL * 4096
    assert len(server.seen) == 1


def test_a_content_length_beyond_the_trusted_length_is_refused_before_writing(
    server: MisbehavingServer, dest: Path
) -> None:
    server.rules.append(Misbehaviour(declared_length=10 * len(CONTENT)))
    with pytest.raises(LengthMismatchError, match=f"offers {10 * len(CONTENT)} bytes"):
        download(server, dest)
    assert_untouched(dest)


def test_short_data_is_refused(server: MisbehavingServer, dest: Path) -> None:
    server.files[PATH] = CONTENT[:1000]
    with pytest.raises(LengthMismatchError, match="offers 1000 bytes"):
        download(server, dest)
    assert_untouched(dest)
    assert len(server.seen) == 1


def test_short_data_without_content_length_is_refused(
    server: MisbehavingServer, dest: Path
) -> None:
    server.files[PATH] = CONTENT[:1000]
    server.rules.append(Misbehaviour(declare_length=False))
    with pytest.raises(LengthMismatchError, match=r"sent 1000 bytes.*short data"):
        download(server, dest)
    assert len(server.seen) == 1


def test_404_is_refused_without_retrying(server: MisbehavingServer, dest: Path) -> None:
    server.rules.append(Misbehaviour(status=404))
    with pytest.raises(
        DownloadError, match=r"refused http://127\.0\.0\.1:\d+/root\.erofs: HTTP 404"
    ) as e:
        download(server, dest, attempts=3)
    assert e.value.status == 404 and e.value.url == url(server)
    assert len(server.seen) == 1
    assert_untouched(dest)


def test_500_is_retried_a_bounded_number_of_times(server: MisbehavingServer, dest: Path) -> None:
    server.rules.append(Misbehaviour(status=500))
    with pytest.raises(DownloadError, match="HTTP 500 Internal Server Error") as e:
        download(server, dest, attempts=3)
    assert e.value.status == 500
    assert len(server.seen) == 3
    assert_untouched(dest)


def test_connection_reset_is_refused_when_attempts_run_out(
    server: MisbehavingServer, dest: Path
) -> None:
    server.rules.append(Misbehaviour(times=1, cut_at=300 * KiB, reset=True))
    with pytest.raises(DownloadError, match=r"after \d+ of 1048580 bytes") as e:
        download(server, dest, attempts=1)
    assert e.value.status == 200
    assert len(server.seen) == 1


def test_resume_after_a_drop_fetches_only_the_rest(server: MisbehavingServer, dest: Path) -> None:
    half = 512 * KiB
    server.rules.append(Misbehaviour(times=1, cut_at=half))
    download(server, dest, attempts=2)
    assert_written(dest)
    log = [(e.range, e.status, e.sent) for e in server.seen]
    assert log == [(None, 200, half), (f"bytes={half}-", 206, len(CONTENT) - half)]


def test_resume_after_a_reset_fetches_only_the_rest(server: MisbehavingServer, dest: Path) -> None:
    server.rules.append(Misbehaviour(times=1, cut_at=512 * KiB, reset=True))
    download(server, dest, attempts=2)
    assert_written(dest)
    first, second = server.seen
    # A reset may discard what the client had not read yet: it asks for what it lacks.
    assert second.range is not None
    got = int(second.range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < got <= first.sent
    assert second.status == 206 and second.sent == len(CONTENT) - got


def test_resume_across_calls_rehashes_what_is_on_disk(
    server: MisbehavingServer, dest: Path
) -> None:
    half = 512 * KiB
    server.rules.append(Misbehaviour(times=1, cut_at=half))
    state = dest.parent / "state.json"
    with pytest.raises(DownloadError, match="after 524288 of 1048580 bytes"):
        download(server, dest, attempts=1, state_path=state)
    record = json.loads(state.read_text())
    assert record == {
        "format": 1,
        "url": url(server),
        "sha256": SHA256,
        "length": len(CONTENT),
        "offset": OFFSET,
        "done": half,
    }
    download(server, dest, state_path=state)
    assert_written(dest)
    assert [(e.range, e.sent) for e in server.seen] == [
        (None, half),
        (f"bytes={half}-", len(CONTENT) - half),
    ]
    assert not state.exists()


def test_resume_trusts_nothing_already_on_disk(server: MisbehavingServer, dest: Path) -> None:
    server.rules.append(Misbehaviour(times=1, cut_at=512 * KiB))
    state = dest.parent / "state.json"
    with pytest.raises(DownloadError):
        download(server, dest, attempts=1, state_path=state)
    with dest.open("r+b") as f:  # a byte of the first half changes while the agent is down
        f.seek(OFFSET + 1000)
        f.write(b"!")
    with pytest.raises(VerificationError):
        download(server, dest, state_path=state)
    assert server.seen[1].range == f"bytes={512 * KiB}-"
    assert not state.exists()  # so the next attempt starts from byte 0
    download(server, dest, state_path=state)
    assert server.seen[2].range is None
    assert_written(dest)


def test_verity_digests_cover_the_bytes_read_back_to_resume(
    server: MisbehavingServer, dest: Path
) -> None:
    server.rules.append(Misbehaviour(times=1, cut_at=300 * KiB + 5))
    state = dest.parent / "state.json"
    with pytest.raises(DownloadError):
        download(server, dest, attempts=1, state_path=state)
    salt = b"salt"
    blocks = verity.BlockHashes(salt)
    blocks.update(b"left over from some other download")
    download(server, dest, state_path=state, blocks=blocks)
    whole = len(CONTENT) - len(CONTENT) % 4096
    expected = b"".join(
        hashlib.sha256(salt + CONTENT[i : i + 4096]).digest() for i in range(0, whole, 4096)
    )
    assert bytes(blocks.digests) == expected


def _verity_digests(salt: bytes, content: bytes) -> bytes:
    whole = len(content) - len(content) % 4096
    return b"".join(
        hashlib.sha256(salt + content[i : i + 4096]).digest() for i in range(0, whole, 4096)
    )


@pytest.mark.parametrize("chunk", [1000, 4096, 64 * KiB + 3])
def test_without_the_sha256_pass_the_block_digests_are_the_check(
    server: MisbehavingServer, dest: Path, chunk: int
) -> None:
    # A root image is hashed once: its blocks, on two threads, must come back in order whatever
    # the size of the reads; the sha256 given only names the download, so other bytes pass here
    # and are the caller's to refuse by their digests (install.py checks the tree).
    server.files[PATH] = other = os.urandom(len(CONTENT))
    salt = b"salt"
    blocks = verity.BlockHashes(salt)
    download(server, dest, blocks=blocks, check_sha256=False, chunk=chunk)
    assert_written(dest, other)
    assert bytes(blocks.digests) == _verity_digests(salt, other)


def test_an_unchecked_sha256_needs_block_digests(server: MisbehavingServer, dest: Path) -> None:
    with pytest.raises(ValueError, match="needs its block digests"):
        download(server, dest, check_sha256=False)
    assert_untouched(dest)


def test_state_for_another_target_is_ignored(server: MisbehavingServer, dest: Path) -> None:
    state = dest.parent / "state.json"
    other = {"format": 1, "url": url(server), "sha256": "0" * 64, "length": len(CONTENT)}
    state.write_text(json.dumps({**other, "offset": OFFSET, "done": 1000}))
    download(server, dest, state_path=state)
    assert server.seen[0].range is None
    assert_written(dest)


def test_progress_is_recorded_during_the_transfer(server: MisbehavingServer, dest: Path) -> None:
    state = dest.parent / "state.json"
    recorded: list[int] = []

    def peek(done: int) -> None:
        if state.exists():
            recorded.append(json.loads(state.read_text())["done"])

    # Reads of at most 128 KiB: several progress calls come after each record.
    download(
        server, dest, state_path=state, state_interval=256 * KiB, chunk=128 * KiB, progress=peek
    )
    distinct = sorted(set(recorded))
    assert distinct and distinct[0] >= 256 * KiB and distinct[-1] < len(CONTENT)
    assert all(b - a >= 256 * KiB for a, b in itertools.pairwise(distinct))
    assert not state.exists()


@pytest.mark.parametrize("direct", [False, True], ids=["page-cache", "o-direct"])
def test_a_record_never_points_past_bytes_not_yet_written(
    server: MisbehavingServer, dest: Path, direct: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Writes run on a helper thread; each record must wait for them (what a resume trusts).
    state = dest.parent / "state.json"
    checked: list[int] = []

    def peek(done: int) -> None:
        if state.exists():
            recorded = json.loads(state.read_text())["done"]
            on_disk = dest.read_bytes()[OFFSET : OFFSET + recorded]
            assert on_disk == CONTENT[:recorded], f"record of {recorded} bytes ran ahead"
            checked.append(recorded)

    monkeypatch.setattr(fetch, "_STAGE", 96 * KiB)  # records fall inside and between stages
    download(
        server,
        dest,
        state_path=state,
        state_interval=64 * KiB,
        chunk=40 * KiB,
        progress=peek,
        direct=direct,
    )
    assert len(set(checked)) >= 8
    assert_written(dest)


@pytest.mark.parametrize("direct", [False, True], ids=["page-cache", "o-direct"])
def test_a_failed_write_is_a_storage_error_and_not_retried(
    server: MisbehavingServer, direct: bool
) -> None:
    # /dev/full refuses every write with ENOSPC, as a failing disk would.
    with pytest.raises(StorageError, match=f"writing at offset {OFFSET} failed: .*No space"):
        download(server, Path("/dev/full"), chunk=64 * KiB, direct=direct)
    assert len(server.seen) == 1


def _spy_on_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, int, int]]:
    """Every pwrite as (through O_DIRECT, position, length); the writes still happen."""
    seen: list[tuple[bool, int, int]] = []
    real = os.pwrite

    def pwrite(fd: int, data: bytes, position: int) -> int:
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        written = real(fd, data, position)
        seen.append((direct, position, written))
        return written

    monkeypatch.setattr(os, "pwrite", pwrite)
    return seen


def test_direct_writes_bypass_the_page_cache_for_every_whole_block(
    server: MisbehavingServer, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch, "_STAGE", 256 * KiB)  # several stages
    writes = _spy_on_writes(monkeypatch)
    download(server, dest, chunk=100_000, direct=True)
    assert_written(dest)
    direct = [(p, n) for d, p, n in writes if d]
    assert all(p % 4096 == 0 and n % 4096 == 0 for p, n in direct)
    # OFFSET is not block-aligned: only the head up to the first boundary and the tail after
    # the last one may go through the page cache.
    first = -OFFSET % 4096
    last = (OFFSET + len(CONTENT)) % 4096
    assert sum(n for d, _, n in writes if not d) == first + last
    assert sum(n for _, n in direct) == len(CONTENT) - first - last


def test_direct_resume_from_an_unaligned_point_across_calls(
    server: MisbehavingServer, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cut = 300 * KiB + 123
    server.rules.append(Misbehaviour(times=1, cut_at=cut))
    state = dest.parent / "state.json"
    monkeypatch.setattr(fetch, "_STAGE", 64 * KiB)
    with pytest.raises(DownloadError):
        download(server, dest, attempts=1, state_path=state, direct=True, chunk=10_000)
    assert json.loads(state.read_text())["done"] == cut
    writes = _spy_on_writes(monkeypatch)
    download(server, dest, state_path=state, direct=True)
    assert_written(dest)
    assert server.seen[1].range == f"bytes={cut}-"
    assert any(d for d, _, _ in writes)


def test_without_o_direct_support_the_page_cache_is_used(
    server: MisbehavingServer, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some file systems refuse the flag at open, others the alignment at the first write.
    real = os.pwrite

    def refuse_direct(fd: int, data: bytes, position: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, data, position)

    monkeypatch.setattr(os, "pwrite", refuse_direct)
    download(server, dest, direct=True)
    assert_written(dest)


def test_server_ignoring_range_restarts_from_zero(server: MisbehavingServer, dest: Path) -> None:
    # The first answer is cut; every answer, the first too, ignores the Range.
    server.rules.append(Misbehaviour(times=1, cut_at=512 * KiB, ignore_range=True))
    server.rules.append(Misbehaviour(ignore_range=True))
    download(server, dest, attempts=2)
    assert_written(dest)
    log = [(e.range, e.status, e.sent) for e in server.seen]
    assert log == [(None, 200, 512 * KiB), (f"bytes={512 * KiB}-", 200, len(CONTENT))]


def test_slow_retrieval_is_refused(server: MisbehavingServer, dest: Path) -> None:
    # 1 KiB every 20 ms: about 50 KiB/s, each read well within the read timeout.
    server.rules.append(Misbehaviour(piece=KiB, delay=0.02))
    started = time.monotonic()
    with pytest.raises(SlowRetrievalError, match="below the minimum of 1000000 bytes/s"):
        download(server, dest, attempts=2, min_rate=1_000_000, rate_window=0.3)
    assert time.monotonic() - started < 3
    assert len(server.seen) == 2
    # The second attempt resumed where the first one stopped.
    assert server.seen[1].range is not None


def test_a_rate_above_the_minimum_passes(server: MisbehavingServer, dest: Path) -> None:
    server.rules.append(Misbehaviour(piece=128 * KiB, delay=0.01))
    download(server, dest, min_rate=200_000, rate_window=0.05)
    assert_written(dest)


def test_a_stalled_server_times_out(server: MisbehavingServer, dest: Path) -> None:
    server.rules.append(Misbehaviour(stall=3))
    started = time.monotonic()
    with pytest.raises(DownloadError, match="timed out"):
        download(server, dest, attempts=1, timeout=(1.0, 0.5))
    assert time.monotonic() - started < 2.5


def test_write_file_atomic_replaces_whole(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    target.write_text("old")
    files.write_file_atomic(target, b"new", mode=0o600)
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_resume_false_ignores_the_state_file(server: MisbehavingServer, dest: Path) -> None:
    state = dest.parent / "state.json"
    record = {"format": 1, "url": url(server), "sha256": SHA256, "length": len(CONTENT)}
    state.write_text(json.dumps({**record, "offset": OFFSET, "done": 1000}))
    download(server, dest, state_path=state, resume=False)
    assert [e.range for e in server.seen] == [None]
    assert_written(dest)


def test_a_file_that_shrank_on_the_server_restarts_then_is_refused(
    server: MisbehavingServer, dest: Path
) -> None:
    state = dest.parent / "state.json"
    record = {"format": 1, "url": url(server), "sha256": SHA256, "length": len(CONTENT)}
    state.write_text(json.dumps({**record, "offset": OFFSET, "done": 2000}))
    server.files[PATH] = CONTENT[:1000]
    with pytest.raises(LengthMismatchError, match="offers 1000 bytes from byte 0"):
        download(server, dest, state_path=state)
    assert [(e.range, e.status) for e in server.seen] == [
        ("bytes=2000-", 416),
        (None, 200),
    ]
    assert not state.exists()


def test_verity_digests_survive_a_retry_within_the_call(
    server: MisbehavingServer, dest: Path
) -> None:
    # A connection cut mid-file is retried in the same call: the digests of what the failed
    # attempt received (some still being computed when it failed) must stay, in order.
    server.rules.append(Misbehaviour(times=1, cut_at=700 * KiB + 5))
    salt = b"salt"
    blocks = verity.BlockHashes(salt)
    download(server, dest, blocks=blocks, check_sha256=False, chunk=64 * KiB)
    assert server.seen[1].range == f"bytes={700 * KiB + 5}-"
    assert_written(dest)
    assert bytes(blocks.digests) == _verity_digests(salt, CONTENT)


def test_without_hashing_processes_a_thread_computes_the_same_digests(
    server: MisbehavingServer,
    dest: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A machine where no child can start (no interpreter at sys.executable, a process limit):
    # the download goes on, hashed on a thread, with the same result.
    monkeypatch.setattr("updater.disk.hashers.sys.executable", "/nonexistent/python3")
    salt = b"salt"
    blocks = verity.BlockHashes(salt)
    download(server, dest, blocks=blocks, check_sha256=False, chunk=64 * KiB + 3)
    assert_written(dest)
    assert bytes(blocks.digests) == _verity_digests(salt, CONTENT)
    assert "cannot start a block hashing process" in caplog.text
    assert "hashing on a thread instead" in caplog.text
